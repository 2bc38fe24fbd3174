"""
Which LLM layer tells the decoder where each object is? A probe with the decoder's view of its context.

The MMDiT's context has no positional encoding of its own: whatever order the caption's words come in,
the DiT sees a set of token states. This probe trains, on the frozen LLM states (before the projector) of complete
captions (Encoder.prompt_hidden at a given prompt_layer), a small position-free transformer with 9 learned
cell queries to classify each cell's object (empty, or shape x colour x size: 49 classes), and reports
held-out accuracy. Token embeddings (layer 0) are a bag of words: they cannot tell which colour goes with
which cell, only a layer that mixes the words can.

    python tools/probe_layers.py --llm=checkpoints/toy/llm --layers=[0,1,2,4]   # ~6 min per layer on 2 CPU cores
"""
import os
import sys
import time

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import configure  # noqa: E402
from data.shapes import world  # noqa: E402
from model_encoder import Encoder  # noqa: E402

config = dict(llm='checkpoints/toy/llm', data_dir='data/shapes/out', layers=[0, 1, 2, 4],
              train_captions=8000, steps=1500, batch_size=64, lr=1e-3, seed=0)


def cell_labels(records):
    """(N, 9) class per cell: 0 empty, else 1 + (shape, colour, size) index."""
    colors, sizes = list(world.COLORS), list(world.SIZES)
    y = torch.zeros(len(records), world.GRID * world.GRID, dtype=torch.long)
    for i, r in enumerate(records):
        for o in r['scene']['objects']:
            y[i, o['cell'][0] * world.GRID + o['cell'][1]] = 1 + (world.SHAPES.index(o['shape']) * len(colors)
                                                                + colors.index(o['color'])) * len(sizes) + sizes.index(o['size'])
    return y


@torch.no_grad()
def states(enc, records, layer, chunk=256):
    """(N, L, hidden) prompt states of the complete captions, zero-padded to one length."""
    enc.config.prompt_layer = layer
    out = [enc.prompt_hidden([r['captions']['complete'] for r in records[i:i + chunk]])
           for i in range(0, len(records), chunk)]
    L = max(o.shape[1] for o in out)
    return torch.cat([nn.functional.pad(o, (0, 0, 0, L - o.shape[1])) for o in out])


class Probe(nn.Module):
    def __init__(self, hidden, n_classes, d=128):
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(hidden, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.cells = nn.Parameter(torch.randn(world.GRID * world.GRID, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, 2, 2 * d, 0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, 3, enable_nested_tensor=False)
        self.head = nn.Linear(d, n_classes)

    def forward(self, h):  # (B, L, hidden) -> (B, 9, classes); no positions anywhere, as in the DiT's context
        x = torch.cat([self.cells.expand(len(h), -1, -1), self.proj(h)], 1)
        return self.head(self.blocks(x)[:, :self.cells.shape[0]])


def main():
    cfg = configure(config)
    torch.manual_seed(cfg['seed'])
    enc = Encoder.from_pretrained(cfg['llm']).eval()
    _, train = world.load_split(os.path.join(cfg['data_dir'], 'train'))
    _, val = world.load_split(os.path.join(cfg['data_dir'], 'val'))
    train = train[:cfg['train_captions']]
    y_train, y_val = cell_labels(train), cell_labels(val)
    n_classes = 1 + len(world.SHAPES) * len(world.COLORS) * len(world.SIZES)
    for layer in cfg['layers']:
        t0 = time.time()
        h_train, h_val = states(enc, train, layer), states(enc, val, layer)
        probe = Probe(h_train.shape[-1], n_classes)
        opt = torch.optim.AdamW(probe.parameters(), cfg['lr'])
        for _ in range(cfg['steps']):
            idx = torch.randint(0, len(train), (cfg['batch_size'],))
            loss = nn.functional.cross_entropy(probe(h_train[idx]).flatten(0, 1), y_train[idx].flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            pred = probe(h_val).argmax(-1)
        objects = y_val > 0
        print(f'layer {layer}: held-out accuracy over cells {(pred == y_val).float().mean():.3f}, over objects '
              f'{(pred[objects] == y_val[objects]).float().mean():.3f} ({time.time() - t0:.0f} s)', flush=True)


if __name__ == '__main__':
    main()
