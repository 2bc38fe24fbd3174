"""The repository's modules beside the installed reference libraries, as a user runs them: from the
repository root, which is first on sys.path, so a top-level name of ours would shadow an installed
package of the same name. (Our kernels/ folder once did: transformers 5.25 imports Hugging Face's
`kernels` package for Qwen2.5-VL and got ours.)"""
import glob
import importlib.metadata
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# run with cwd = the repository root: `python -c` puts the cwd first on sys.path, as
# `python train_rl.py` puts the script's folder
IMPORTS = '''
import sys
import common
assert 'triton' not in sys.modules, 'importing common imported triton'
for name in {modules}:
    __import__(name)
ka = common.attention_kernels()
assert common.attention_kernels() is ka, 'kernels/attention.py loaded twice'
import transformers.models.qwen2_5_vl.modeling_qwen2_5_vl
from diffusers.models.transformers.transformer_sd3 import SD3Transformer2DModel
from diffusers.loaders import SD3LoraLoaderMixin
from peft import LoraConfig, get_peft_model
print('imported')
'''


def our_modules():
    """The top-level names the repository root claims: its .py files and its regular packages."""
    names = [os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, '*.py'))]
    packages = glob.glob(os.path.join(ROOT, '*', '__init__.py'))
    names += [os.path.basename(os.path.dirname(p)) for p in packages]
    return sorted(names)


def test_our_modules_then_the_reference_libraries_import():
    # every top-level script keeps its work under `if __name__ == '__main__'`: importing it is cheap
    modules = [m for m in our_modules() if m != 'common']
    env = dict(os.environ, OMP_NUM_THREADS='1')
    script = IMPORTS.format(modules=modules)
    run = subprocess.run([sys.executable, '-c', script], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and 'imported' in run.stdout, run.stderr[-3000:]


def test_no_top_level_name_shadows_an_installed_package():
    installed = importlib.metadata.packages_distributions()  # import name -> distributions
    clashes = {name: installed[name] for name in our_modules() if name in installed}
    assert not clashes, f"the repository root shadows installed packages: {clashes}"
