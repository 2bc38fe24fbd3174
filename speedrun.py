"""
The speedrun: UAE's whole story on the toy world, from nothing to a report card, in one command.

    python speedrun.py                      # seed 1: everything in out/speedrun/seed1, report.md last
    python speedrun.py --seed=2             # another training seed, in out/speedrun/seed2
    python speedrun.py --summary=out/speedrun/seed1,out/speedrun/seed2   # one report card over the seeds
    python speedrun.py --ship=out/speedrun/seed1      # make a run's models the shipped checkpoints/toy
    python speedrun.py --small=True --scale=0.001 --n_train=400 --out_dir=/tmp/sr   # every stage, tiny (the test)

The stages, each a command of the other scripts (the exact commands are in <out_dir>/commands.sh):
    data        data/shapes/prepare.py              the toy world (the same for every seed)
    enc_sft     train_sft.py --model=encoder        a terse captioner
    dec_sft     train_sft.py --model=decoder        text-to-image, conditioned on the encoder's LLM
    enc_size    train_sft.py --model=encoder        the size words (LLM layers 1-3 only: what the decoder
    enc_terse                                         reads, the states after layer 0, does not move)
    g4u1, u4g1  train_rl.py                         round 1 of Unified-GRPO: the encoder learns to caption
    g4u2, u4g2                                      for reconstruction, then the decoder to read its captions;
                                                      round 2 trains both adapters further
    eval_<x>    bench.py                            Unified-Bench (I2T2I), Toy-GenEval and understanding on
                                                      the held-out test split after each stage (not rerun
                                                      where the stage left the models alone: evaluated_at)
    report      report.md, the curves and a contact sheet (originals / SFT / last stage)

A stage starts as soon as what it reads exists and its threads are free (`cores` in all: more threads than
cores slowed the decoder's SFT 3.5x). Each stage's thread count is fixed, so the results depend on the seed
and `threads` only, not on which stages happened to run side by side: `threads` for the encoder's SFT and
the RL stages, 1 for the decoder's SFT (the encoder's size stages, 1 each, run beside it) and for each
evaluation (two at a time after the RL stages, which need both cores).

Nothing is lost to a kill: a finished stage is recorded in <out_dir>/timing.json and skipped by the next
run; a killed training stage continues from its last checkpoint (--resume), a killed evaluation keeps the
reconstructions it wrote (bench.py resumes) or starts again.
"""
import os
import shlex
import shutil
import subprocess
import sys
import time

import numpy as np
import torch
from PIL import Image

from common import atomic_write, configure, read_json, run, save_json

config = dict(
    seed=1,                 # the training seed (the toy world's data is the same for every seed)
    out_dir='',             # default out/speedrun/seed<seed>
    summary='',             # comma-separated run folders: write their report card (to out_dir, a .md path) and stop
    ship='',                # a finished run folder: copy its models, logs and report into checkpoints/toy and stop
    cores=2,                # threads running at once, over all stages
    # threads of the encoder's SFT and the RL stages (the others get 1). Results differ in the last bits with
    # the thread count. Alone on 2 cores with 2 threads: encoder SFT 2.3 it/s, G4U 5 s a step, U4G 4.3
    threads=2,
    scale=1.0,              # multiplies every stage's steps (a quick check of the pipeline: 0.01)
    n_train=50_000,         # the toy world's training split
    small=False,            # tiny data, batches and evaluations: checks that every stage runs, measures nothing
    # encoder SFT: a terse captioner (the vision tower frozen at first: train_sft.py says why), then its size
    # words on complete captions, then back to the terse mix
    enc_steps=900, enc_freeze_vision=600, size_steps=200,
    # decoder SFT: complete and 'named' captions (every object named, some attributes left open), its frozen
    # projector fitted to whiten the LLM states (train_sft's projector_init), at SD3's noise levels (train_sft's
    # train_shift 3), its loss weighing the codec's channels by their scale (latent_weight_power 1): validation
    # object F1 1.00 / 1.00 at step 800 (seeds 1 / 2; unweighted 0.98 / 0.98); a random projector had 0.13 after
    # 3,000 steps on seed 1. Reading is learnt by step 800; drawing cleanly is not: from the true test captions
    # ghosts / halos 0.011 / 0.038 and 0.010 / 0.037 at 800 steps, 0.008 / 0.022 and 0.006 / 0.022 at 1,600,
    # Toy-GenEval 0.330 / 0.217 and 0.410 / 0.297 (seeds 1 / 2; docs/toy_world.md finding 10). Most of what is
    # left was the sampler's last steps, below sigma 0.3, which SD3's noise levels hardly train: an eighth of
    # each batch there (train_sft's low_sigma_share) left 0.005 / 0.014 on seed 1 (finding 11)
    dec_steps=1600, dec_lr=1e-3, dec_levels="{'complete': 0.8, 'named': 0.2}", dec_low_sigma_share=0.125,
    # G4U of round 1 does nearly all of the loop's work (I2T2I object F1 0.24 -> 0.90 in 20 steps, seed 2).
    # U4G's reward starts at 0.93-0.99 of 1 on the G4U encoder's captions: 40 steps (recipe C) and 20 (recipe
    # E) moved neither it nor any evaluation in either round (docs/results.md). With recipe H's and I's decoders
    # the 8 images of a caption nearly always score the same: 0 updates in 20 steps on seed 1, 3 and 2 on seed 2
    g4u1_steps=30, u4g1_steps=10, g4u2_steps=30, u4g2_steps=10,
    # measured on the toy (train_rl.py --stage=g4u --steps=30, one seed): two updates per batch of rollouts
    # reached held-out object F1 0.635 at step 15 against 0.406, for 7 % more CPU; U4G without its
    # zero-advantage samples (44 % of them) learnt as much in 10 steps for 23 % less CPU. (G4U's adapter
    # leaves LLM layer 0, which the decoder reads, alone: train_rl.py's llm_lora_below_prompt_layer)
    g4u_args='--num_iterations=2', u4g_args='--drop_zero_advantage=True',
)
ROUNDS = ('sft', 'g4u1', 'u4g1', 'g4u2', 'u4g2')  # the report's rows, in order
ADAPTERS = {'sft': ('', ''), 'g4u1': ('g4u1', ''), 'u4g1': ('g4u1', 'u4g1'), 'g4u2': ('g4u2', 'u4g1'),
            'u4g2': ('g4u2', 'u4g2')}  # stage -> the stages whose (llm_lora, dit_lora) the UAE after it loads
LAYERS_1_3 = 'language_model.layers.1.,language_model.layers.2.,language_model.layers.3.'


# -----------------------------------------------------------------------------
# the stages: name -> (the stages it reads, the command)

def evaluated_at(name, task, cfg):
    """The stage whose evaluation `task` also scores the UAE after stage `name`: the first with the same adapters
    in the models the task runs. Unified-Bench runs both; Understanding the encoder alone, which U4G leaves alone;
    Toy-GenEval the decoder, which reads the LLM's states below the layers G4U adapts (train_rl's
    llm_lora_below_prompt_layer), so its figures after G4U are the stage before's, bit for bit."""
    reads = {'unibench': (0, 1), 'geneval': (1,), 'understanding': (0,)}[task]  # indices into ADAPTERS' pairs
    if task == 'geneval' and '--llm_lora_below_prompt_layer=true' in cfg['g4u_args'].lower().split():
        reads = (0, 1)
    key = lambda n: [ADAPTERS[n][i] for i in reads]
    return next(n for n in ROUNDS if key(n) == key(name))


def stages(cfg, out):
    py = sys.executable
    data = f'{out}/data'
    steps = lambda k: max(2, round(cfg[k] * cfg['scale']))
    seed = f"--seed={cfg['seed']}"
    small = dict(data=['--n_val=50', '--n_test=8'], sft=['--batch_size=8', '--eval_images=8'],
                 rl=['--images_per_step=2', '--group_size=2', '--max_new_tokens=32'],
                 geneval=['--prompts=2'], caption=['--max_new_tokens=32'])  # an untrained captioner babbles
    small = small if cfg['small'] else {k: [] for k in small}
    s = {'data': ([], [py, 'data/shapes/prepare.py', f'--out={data}', f"--n_train={cfg['n_train']}", '--tokenizer=',
                       *small['data']])}

    def sft(name, deps, n, *args, evals=4, saves=4):  # evaluated a few times (the curve) and saved (resumable)
        s[name] = (deps, [py, 'train_sft.py', f'--data_dir={data}', seed, f'--out_dir={out}/{name}', f'--max_steps={n}',
                          f'--eval_every={max(1, n // evals)}', f'--save_every={max(1, n // saves)}', *small['sft'], *args])
    sft('enc_sft', ['data'], steps('enc_steps'), '--model=encoder', f"--freeze_vision_steps={round(cfg['enc_freeze_vision'] * cfg['scale'])}")
    sft('dec_sft', ['enc_sft'], steps('dec_steps'), '--model=decoder', f'--encoder={out}/enc_sft/llm', '--prompt_layer=1',
        f"--levels={cfg['dec_levels']}", f"--lr={cfg['dec_lr']}", f"--low_sigma_share={cfg['dec_low_sigma_share']}",
        evals=2)  # an evaluation draws 64 images: ~10 s
    # the size words: LLM layers 1-3 only, so the states after layer 0 (what the decoder reads) stay as they were
    for name, init, levels in (('enc_size', 'enc_sft', ["--levels={'complete': 1.0}"]), ('enc_terse', 'enc_size', [])):
        sft(name, [init], steps('size_steps'), '--model=encoder', f'--init_from={out}/{init}/llm', *levels, '--freeze_vision_steps=0',
            f'--train_only={LAYERS_1_3}', evals=1, saves=1)
    s['sft'] = (['dec_sft', 'enc_terse'], None)  # assemble_sft, in this process
    # the UAE being trained: the terse encoder's LLM read by the decoder at its layer (assemble_sft) with
    # the decoder; then the adapters each stage loads, from the
    # stage before it. train_rl.py trains the loaded adapter of the model it trains further (round 2 continues
    # round 1's) and keeps the other frozen
    uae = [f'--llm={out}/sft/llm', f'--dit={out}/dec_sft/dit', f'--vae={out}/dec_sft/codec.safetensors',
           f'--pooled={out}/dec_sft/pooled.safetensors']

    def model(name):
        llm_lora, dit_lora = ADAPTERS[name]
        return [*uae, f'--llm_lora={out}/{llm_lora}/llm_lora' if llm_lora else '--llm_lora=',
                f'--dit_lora={out}/{dit_lora}/dit_lora' if dit_lora else '--dit_lora=']
    for prev, name in zip(ROUNDS, ROUNDS[1:]):
        n = steps(f'{name}_steps')
        s[name] = ([prev], [py, 'train_rl.py', f'--stage={name[:3]}', f'--data_dir={data}', seed, *model(prev),
                            f'--steps={n}', '--eval_images=0', f'--save_every={max(1, n // 4)}', *small['rl'],
                            *cfg[f'{name[:3]}_args'].split(), f'--out_dir={out}/{name}'])
    # the evaluations, the longest first (two run at a time at the end: the last to start should be short); one
    # whose models the stage did not change is not rerun (evaluated_at)
    for task in ('geneval', 'unibench', 'understanding'):
        for name in [n for n in ROUNDS if evaluated_at(n, task, cfg) == n]:
            s[f'eval_{name}_{task}'] = ([name], [py, 'bench.py', *model(name), f'--out_dir={out}/eval_{name}/{task}']
                                        + ([f'--task={task}'] if task != 'unibench' else [])
                                        + ([f'--images={data}/test', *small['caption']] if task != 'geneval' else [])
                                        + (small['geneval'] if task == 'geneval' else []))
    return s


# -----------------------------------------------------------------------------
# running them: each as soon as the stages it reads are done and its threads are free

def assemble_sft(out):
    """<out>/sft/llm, the UAE's LLM after SFT: the terse captioner's weights (enc_terse) with the decoder's
    projector and conditioning layer (dec_sft's llm/: the projector fitted to what the decoder reads, prompt_layer
    1; without it the decoder would read the last layer, which it never saw). The decoder was trained on
    enc_sft's LLM, so what it reads of the two must be the same: the embeddings and LLM layer 0, bit for bit."""
    from model_encoder import Encoder
    enc, dec = Encoder.from_pretrained(f'{out}/enc_terse/llm'), Encoder.from_pretrained(f'{out}/dec_sft/llm')
    a, b = enc.state_dict(), dec.state_dict()
    read = [k for k in a if 'embed_tokens' in k or '.layers.0.' in k and 'visual' not in k]
    differ = [k for k in read if not torch.equal(a[k], b[k])]
    if not read or differ:
        raise ValueError(f'{out}/enc_terse/llm and {out}/dec_sft/llm differ in what the decoder reads: {differ or "nothing compared"}')
    enc.projector.load_state_dict(dec.projector.state_dict())
    enc.config.prompt_layer = dec.config.prompt_layer
    shutil.rmtree(f'{out}/sft/llm.tmp', ignore_errors=True)
    enc.save_pretrained(f'{out}/sft/llm.tmp')
    shutil.rmtree(f'{out}/sft/llm', ignore_errors=True)
    os.replace(f'{out}/sft/llm.tmp', f'{out}/sft/llm')
    return 0.0


def run_stages(cfg, out):
    plan = stages(cfg, out)
    os.makedirs(f'{out}/logs', exist_ok=True)
    with open(f'{out}/commands.sh', 'w') as f:  # what ran, in an order that respects the dependencies
        f.write(''.join(f'{shlex.join(cmd)} > {out}/logs/{k}.log\n' for k, (_, cmd) in plan.items() if cmd))
    timing_path = f'{out}/timing.json'
    timing = read_json(timing_path) if os.path.exists(timing_path) else {}
    done = {k for k in plan if k in timing}  # timing.json is written atomically after each stage
    running, t0 = {}, time.time()
    todo = [k for k in plan if k not in done]
    print(f"speedrun seed {cfg['seed']}: {len(todo)} of {len(plan)} stages to run on {cfg['cores']} cores -> {out}",
          flush=True)
    while todo or running:
        for k in [k for k in todo if all(d in done for d in plan[k][0])]:
            deps, cmd = plan[k]
            if cmd is None:  # the sft check
                todo.remove(k)
                timing[k] = assemble_sft(out)
                save_json(timing, timing_path)
                done.add(k)
                continue
            n = cfg['threads'] if k == 'enc_sft' or k in ROUNDS else 1
            if sum(r[3] for r in running.values()) + n > cfg['cores']:
                break  # in the plan's order: no later stage takes the cores this one waits for
            todo.remove(k)
            if os.path.exists(f'{out}/{k}/ckpt'):  # killed mid-way: continue from its checkpoint
                cmd = cmd + ['--resume=True']
            log = open(f'{out}/logs/{k}.log', 'a')
            env = dict(os.environ, OMP_NUM_THREADS=str(n), MKL_NUM_THREADS=str(n))
            running[k] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), time.time(), log, n)
            print(f'[{(time.time() - t0) / 60:5.1f} min] start {k}', flush=True)
        time.sleep(0.5)
        for k, (proc, start, log, _) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            del running[k]
            if proc.returncode:
                for other, (p, _, _, _) in running.items():
                    p.terminate()
                tail = open(f'{out}/logs/{k}.log').read().strip().splitlines()[-5:]
                raise ValueError(f"stage {k} failed (exit {proc.returncode}); {out}/logs/{k}.log ends:\n" + '\n'.join(tail))
            timing[k] = round(time.time() - start, 1)
            save_json(timing, timing_path)
            done.add(k)
            left = len(todo) + len(running)
            print(f'[{(time.time() - t0) / 60:5.1f} min] done  {k} in {timing[k] / 60:.1f} min ({left} left)', flush=True)
    timing['wall'] = timing.get('wall', 0) + round(time.time() - t0, 1)  # a resumed run adds its time
    save_json(timing, timing_path)
    return timing


# -----------------------------------------------------------------------------
# the report card

def eval_path(out, name, task, cfg):
    """The summary of evaluation `task` of the UAE after stage `name` in run `out` (evaluated_at's stage);
    cfg: the run's config.json."""
    at = evaluated_at(name, task, cfg)
    return f'{out}/eval_{at}/{task}/{"scores" if task == "unibench" else task}.json'


def read_row(out, name, cfg, scenes):
    """The figures of one stage: {column: value} from its three evaluations, and how clean its
    reconstructions' background is where the parser does not look: the cells that should be empty (ghosts,
    world.empty_cell_residual) and the rest of each object's cell (halos, world.halo_residual).
    cfg: the run's config.json; scenes: its test split's."""
    from data.shapes import world
    recon = [Image.open(f'{out}/eval_{name}/unibench/recon_{i}.png').convert('RGB') for i in range(len(scenes))]
    row = {'unibench.empty_cells': world.mean_residual(world.empty_cell_residual, recon, scenes),
           'unibench.halos': world.mean_residual(world.halo_residual, recon, scenes)}
    for task in ('unibench', 'geneval', 'understanding'):
        path = eval_path(out, name, task, cfg)
        summary = read_json(path)['summary']
        row.update({f'{task}.{k}': v for k, v in summary.items() if isinstance(v, (int, float))})
    return row


TABLES = {  # title: ((json key, header), ...): the report's three tables
    'Unified-Bench (I2T2I)': (
        ('unibench.object_f1', 'object F1'), ('unibench.attribute_f1', 'attribute F1'),
        ('unibench.pixel', 'pixel'), ('unibench.empty_cells', 'ghosts'), ('unibench.halos', 'halos'),
        ('unibench.caption_tokens', 'caption tokens')),
    'Toy-GenEval (the decoder alone)': (
        ('geneval.overall', 'overall'), ('geneval.single_object', 'single object'), ('geneval.two_object', 'two objects'),
        ('geneval.counting', 'counting'), ('geneval.colors', 'colours'), ('geneval.position', 'position'),
        ('geneval.color_attr', 'colour attribution')),
    'Understanding (the encoder alone)': (
        ('understanding.object_recall', 'objects R'), ('understanding.size_recall', 'size R'),
        ('understanding.color_recall', 'colour R'), ('understanding.shape_recall', 'shape R'),
        ('understanding.cell_recall', 'cell R'), ('understanding.size_precision', 'size P'),
        ('understanding.color_precision', 'colour P'), ('understanding.shape_precision', 'shape P'),
        ('understanding.cell_precision', 'cell P'), ('understanding.background_accuracy', 'background')),
}
LABELS = {'sft': 'SFT', 'g4u1': '+G4U', 'u4g1': '+U4G', 'g4u2': '+G4U (round 2)', 'u4g2': '+U4G (round 2)'}


def table(runs):
    """Markdown tables, one row per stage: the value, or over several runs the mean and (min-max)."""
    from data.shapes import world
    cfgs = {out: read_json(f'{out}/config.json') for out in runs}
    scenes = {out: [r['scene'] for r in world.load_split(f'{out}/data/test')[1]] for out in runs}  # read once a run
    done = [n for n in ROUNDS if all(os.path.exists(eval_path(out, n, task, cfgs[out])) for out in runs
                                     for task in ('unibench', 'geneval', 'understanding'))]
    # a run still going: the stages so far
    rows = {name: [read_row(out, name, cfgs[out], scenes[out]) for out in runs] for name in done}
    lines = []
    for title, columns in TABLES.items():
        keys = [(k, h) for k, h in columns if all(k in r for rs in rows.values() for r in rs)]
        lines += [f'**{title}**', '', '| stage | ' + ' | '.join(h for _, h in keys) + ' |', '|---|' + '---:|' * len(keys)]
        for name in done:
            cells = []
            for k, _ in keys:
                v = np.array([r[k] for r in rows[name]])
                fmt = '.1f' if 'tokens' in k else '.3f'
                cells.append(f'{v.mean():{fmt}}' + (f' ({v.min():{fmt}}-{v.max():{fmt}})' if len(v) > 1 else ''))
            lines.append(f'| {LABELS[name]} | ' + ' | '.join(cells) + ' |')
        lines.append('')
    return '\n'.join(lines), rows


def contact_sheet(out, n=12):
    """originals / SFT / the last stage, the first n test images, 2x: what the loop changed, by eye."""
    n = min(n, len([f for f in os.listdir(f'{out}/data/test') if f.endswith('.png')]))
    rows = [[np.asarray(Image.open(f'{out}/data/test/{i}.png').convert('RGB')) for i in range(n)]]
    for name in ('sft', 'u4g2'):
        rows.append([np.asarray(Image.open(f'{out}/eval_{name}/unibench/recon_{i}.png').convert('RGB')) for i in range(n)])
    grid = np.concatenate([np.concatenate(r, axis=1) for r in rows], axis=0)
    img = Image.fromarray(grid)
    atomic_write(f'{out}/contact_sheet.png', lambda tmp: img.resize((img.width * 2, img.height * 2), Image.NEAREST).save(tmp, 'PNG'))


def write_report(runs, path):
    """report.md: the table, whether round 2 helped (per seed), the wall times, the figures of one run."""
    text, rows = table(runs)
    lines = ['# nanoUAE speedrun: report card', '',
             f"Run{'s' if len(runs) > 1 else ''}: {', '.join(f'`{r}`' for r in runs)}. Each stage evaluated on the toy "
             "world's 100 held-out test images (Unified-Bench, understanding) and on 300 prompts of its own "
             "(Toy-GenEval, `bench.py --task geneval`)" + ('; each cell the mean over the runs (min-max).' if len(runs) > 1 else '.'),
             '', text, '',
             'I2T2I: caption, redraw, parse (object F1: shape, colour, size and cell all right; attribute F1: partial '
             'credit). ghosts: the mean |difference| from the background of the cells that should be empty (0 to 1; '
             'world.empty_cell_residual); halos: the same over the rest of each object\'s cell, more than 2 px from '
             'the object (world.halo_residual). G4U leaves what the decoder reads alone and U4G the encoder, so '
             'Toy-GenEval after G4U and Understanding after U4G are the stage before\'s evaluation, not rerun. '
             'GenEval: the fraction of images with exactly the objects the prompt names, each as named. R / P: '
             'recall and precision of each attribute in the captions.', '',
             '## Does round 2 help?', '']
    for k, h in (('unibench.object_f1', 'I2T2I object F1'), ('unibench.attribute_f1', 'I2T2I attribute F1'),
                 ('geneval.overall', 'GenEval'), ('unibench.empty_cells', 'ghosts'), ('unibench.halos', 'halos')):
        if 'u4g2' not in rows:
            lines.append('Not evaluated yet: the runs have not finished round 2.')
            break
        d1 = [r[k] - s[k] for s, r in zip(rows['sft'], rows['u4g1'])]
        d2 = [b[k] - a[k] for a, b in zip(rows['u4g1'], rows['u4g2'])]
        lines.append(f"- {h}: round 1 (SFT to +U4G) {', '.join(f'{x:+.3f}' for x in d1)}; "
                     f"round 2 (+U4G to +U4G round 2) {', '.join(f'{x:+.3f}' for x in d2)}")
    lines += ['', '## Wall time', '']
    for r in runs:
        t = read_json(f'{r}/timing.json')
        if 'wall' not in t:
            lines.append(f'- `{r}`: still running')
            continue
        main_line = ', '.join(f'{k} {v / 60:.1f}' for k, v in t.items() if k != 'wall' and not k.startswith('eval_'))
        n = sum(k.startswith('eval_') for k in t)
        lines.append(f"- `{r}`: {t['wall'] / 60:.1f} min ({main_line}; the {n} evaluations, one thread each, "
                     f"{sum(v for k, v in t.items() if k.startswith('eval_')) / 60:.1f} min of one core)")
    first = os.path.relpath(runs[0], os.path.dirname(os.path.abspath(path)))
    first = '' if first == '.' else first + '/'
    lines += ['', f'## Figures (`{runs[0]}`)', '',
              f'G4U rounds 1 and 2 (reward and caption tokens per step):', '',
              f'![G4U round 1]({first}g4u1/curves.png) ![G4U round 2]({first}g4u2/curves.png)', '',
              'Test images; their reconstructions after SFT; after the last stage:', '',
              f'![contact sheet]({first}contact_sheet.png)', '',
              'The commands of every stage: ' + ', '.join(f'`{r}/commands.sh`' for r in runs)]
    atomic_write(path, lambda tmp: open(tmp, 'w').write('\n'.join(lines) + '\n'))
    print('\n'.join(lines))


SHIPPED = {  # checkpoints/toy/<name>: <run>/<path>. The models after the last stage, and how they were made
    'llm': 'sft/llm', 'dit': 'dec_sft/dit', 'codec.safetensors': 'dec_sft/codec.safetensors',
    'pooled.safetensors': 'dec_sft/pooled.safetensors', 'llm_lora': 'g4u2/llm_lora', 'dit_lora': 'u4g2/dit_lora',
    'sft_encoder_log.jsonl': 'enc_sft/log.jsonl', 'sft_encoder_size_log.jsonl': 'enc_size/log.jsonl',
    'sft_encoder_terse_log.jsonl': 'enc_terse/log.jsonl', 'sft_decoder_log.jsonl': 'dec_sft/log.jsonl',
    **{f'rl_{name}_{f}': f'{name}/{f}' for name in ROUNDS[1:] for f in ('log.jsonl', 'curves.png')},
    'report.md': 'report.md', 'contact_sheet.png': 'contact_sheet.png', 'commands.sh': 'commands.sh'}


def ship(run_dir, dest='checkpoints/toy'):
    """Replace dest with a finished run's models (what the demos and train_rl.py load by default), logs and
    report. The adapters' base_model_name_or_path is pointed at dest's models."""
    if not os.path.exists(f'{run_dir}/report.md'):
        raise ValueError(f'{run_dir} has no report.md: not a finished speedrun')
    tmp = dest.rstrip('/') + '.tmp'
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for name, path in SHIPPED.items():
        (shutil.copytree if os.path.isdir(f'{run_dir}/{path}') else shutil.copy)(f'{run_dir}/{path}', f'{tmp}/{name}')
    with open(f'{tmp}/report.md') as f:  # its figures under their names here
        text = f.read()
    for name, path in SHIPPED.items():
        text = text.replace(f']({path})', f']({name})')
    atomic_write(f'{tmp}/report.md', lambda t: open(t, 'w').write(text))
    for adapter, base in (('llm_lora', 'llm'), ('dit_lora', 'dit')):
        meta = read_json(f'{tmp}/{adapter}/adapter_config.json')
        save_json(dict(meta, base_model_name_or_path=f'{dest}/{base}'), f'{tmp}/{adapter}/adapter_config.json')
    old = dest.rstrip('/') + '.old'
    if os.path.exists(dest):
        os.replace(dest, old)
    os.replace(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)
    print(f'{dest}: the models, logs and report of {run_dir}')


def main():
    cfg = configure(config)
    if cfg['ship']:
        return ship(cfg['ship'].rstrip('/'))
    if cfg['summary']:
        runs = [r.rstrip('/') for r in cfg['summary'].split(',') if r]
        path = cfg['out_dir'] or 'out/speedrun/report.md'
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        write_report(runs, path)
        return
    if not 1 <= cfg['threads'] <= cfg['cores']:
        raise ValueError(f"--threads={cfg['threads']} must be between 1 and --cores={cfg['cores']}")
    out = cfg['out_dir'] or f"out/speedrun/seed{cfg['seed']}"
    os.makedirs(out, exist_ok=True)
    saved = f'{out}/config.json'
    what = lambda c: {k: v for k, v in c.items() if k not in ('summary', 'ship', 'cores')}  # what decides the results
    if os.path.exists(saved) and what(read_json(saved)) != what(cfg):
        raise ValueError(f'{saved} holds another configuration: continue with the same options or use another --out_dir')
    save_json(cfg, saved)
    run_stages(cfg, out)
    contact_sheet(out)
    write_report([out], f'{out}/report.md')


if __name__ == '__main__':
    run(main)
