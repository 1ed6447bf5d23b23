import pytest
import torch
import torch.nn as nn


class MemLayer(nn.Module):
    """Per-layer memory: x += tanh(w(x) + mem); mem' = mem + m(x).mean."""

    def __init__(self, d=8):
        super().__init__()
        self.w = nn.Linear(d, d)
        self.m = nn.Linear(d, d)

    def forward(self, x, mem):
        x = x + torch.tanh(self.w(x) + mem)
        return x, mem + self.m(x).mean(1, keepdim=True)


class PerLayerMemory(nn.Module):
    """Segments of ``segment`` tokens through ``layers`` layers, each with its own
    memory carried to the next segment; ``layer`` builds one layer from ``d``."""

    def __init__(self, layers=2, d=8, segment=4, layer=MemLayer):
        super().__init__()
        self.segment = segment
        self.layers = nn.ModuleList(layer(d) for _ in range(layers))

    def forward(self, x):
        mems = [torch.zeros(x.shape[0], 1, x.shape[-1]) for _ in self.layers]
        outs = []
        for seg in x.split(self.segment, dim=1):
            for l, layer in enumerate(self.layers):
                seg, mems[l] = layer(seg, mems[l])
            outs.append(seg)
        return torch.cat(outs, 1)


class LastToFirst(nn.Module):
    """RMT-shaped: the last layer's output summary feeds the first layer next segment."""

    def __init__(self, layers=3, d=8, segment=4):
        super().__init__()
        self.segment = segment
        self.layers = nn.ModuleList(nn.Linear(d, d) for _ in range(layers))

    def forward(self, x):
        mem = torch.zeros(x.shape[0], 1, x.shape[-1])
        outs = []
        for seg in x.split(self.segment, dim=1):
            h = seg + mem
            for layer in self.layers:
                h = torch.tanh(layer(h))
            mem = h.mean(1, keepdim=True)
            outs.append(h)
        return torch.cat(outs, 1)


def capture(model, *args):
    """Dynamo's graph of model(*args), as the backend would receive it."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model, backend=backend)(*args)
    assert len(graphs) == 1
    return graphs[0]


@pytest.fixture
def per_layer_graph():
    torch.manual_seed(0)
    model = PerLayerMemory(layers=2)
    x = torch.randn(2, 16, 8)  # 4 segments
    return model, x, capture(model, x)


@pytest.fixture
def last_to_first_graph():
    torch.manual_seed(0)
    model = LastToFirst(layers=3)
    x = torch.randn(2, 12, 8)  # 3 segments
    return model, x, capture(model, x)
