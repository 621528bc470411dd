"""torch.compile in the training loop: the first step compiles the training graph, and nothing
after it compiles again (evaluation and in-training sampling run the uncompiled module)."""

import warnings

import pytest
from trainkit import make_data, tiny_config


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("compiledata"))


def test_no_recompiles_after_the_first_step(data, tmp_path, monkeypatch):
    import torch._dynamo
    from torch._dynamo.utils import counters

    import azgpt.train as tr

    tok, d = data
    torch._dynamo.reset()
    counters.clear()
    seen = {}
    real_step = tr.train_step

    def step(run, n, forward):
        loss = real_step(run, n, forward)
        if "first" not in seen:
            seen["first"] = (counters["stats"]["unique_graphs"], counters["frames"]["total"])
        return loss

    monkeypatch.setattr(tr, "train_step", step)
    # Recompiles are dynamo's (guards on grad mode, training flag, shapes); its "eager" backend
    # sees the same ones without inductor's minute of C++ compiling on a small CPU.
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, backend="eager"))
    over = {
        "train.compile": "on",
        "train.max_iters": 6,
        "train.eval_interval": 2,  # three evaluations and samples after the first step
        "train.eval_iters": 2,
        "train.sample_tokens": 8,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a compile fallback warns: fail instead
        res = tr.train(tiny_config(tok, d, tmp_path / "run", **over))
    assert res.ok and res.step == 6
    graphs, frames = seen["first"]
    assert graphs >= 1  # the first step did compile the model
    assert counters["stats"]["unique_graphs"] == graphs, dict(counters["stats"])
    assert counters["frames"]["total"] == frames
