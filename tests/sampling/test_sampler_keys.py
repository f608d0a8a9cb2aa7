"""Any number of shapes and samplers compile: dynamo caches per code object with a limit of 8
entries, so fastdiff compiles each (sampler, key) as its own code object. Checked through a
counting torch.compile backend (the limit is dynamo's, whatever the backend): every key and
every sampler compiles exactly once and its compiled graph is what runs. An unexpected
fallback is an error with compile=True and one loud warning with "auto", which keeps the
keys compiled before."""
import warnings

import pytest
import torch
import torch.nn as nn

import fastdiff.engines.inductor as compile_module
from fastdiff.sampling.sampler import Sampler
from fastdiff.schedulers import ddim_table, linear_schedule

TABLE = ddim_table(linear_schedule(), steps=2, eta=0.5)  # eta > 0: given noise enters every step
IMAGE = (1, 4, 4)


class TinyEps(nn.Module):
    """A cheap eps model (one conv) that takes optional class labels."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, x, t, class_labels=None):
        eps = self.conv(x) * 0.1
        return eps if class_labels is None else eps + class_labels.view(-1, 1, 1, 1).to(eps.dtype) * 0.01


class CountingBackend:
    """A torch.compile backend that counts the graphs compiled and the calls of compiled code;
    ``fail_on`` makes the n-th compile raise (a compiler failure)."""

    def __init__(self, fail_on=()):
        self.compiles, self.runs, self.fail_on = 0, 0, set(fail_on)

    def __call__(self, gm, example_inputs):
        self.compiles += 1
        if self.compiles in self.fail_on:
            raise RuntimeError(f"compile {self.compiles} failed")

        def run(*args):
            self.runs += 1
            return gm.forward(*args)

        return run


@pytest.fixture
def backend(monkeypatch):
    counting = CountingBackend()
    monkeypatch.setattr(compile_module, "BACKEND", counting)
    return counting


def sampler(model=None, **kwargs):
    """Without a cache: the compiles these tests count are torch.compile's, in this process."""
    return Sampler(model or TinyEps(), TABLE, image_shape=IMAGE, **{"compile": True, "cache": False, **kwargs})


def keys():
    """20 distinct keys: batch 1..10, with and without class labels."""
    return [(batch, labels) for batch in range(1, 11) for labels in (False, True)]


def labels_for(batch, with_labels):
    return torch.arange(batch) % 10 if with_labels else None


def test_twenty_keys_in_one_sampler_all_compile(backend):
    fast, eager = sampler(), sampler(compile=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning, no dynamo recompile-limit warning
        for n, (batch, with_labels) in enumerate(keys(), start=1):
            labels = labels_for(batch, with_labels)
            out = fast.sample(batch=batch, seed=n, class_labels=labels)
            assert backend.compiles == n, f"key {n} did not compile"
            runs = backend.runs
            again = fast.sample(batch=batch, seed=n, class_labels=labels)
            assert backend.runs == runs + TABLE.num_steps and backend.compiles == n  # compiled code ran, once compiled
            assert torch.equal(out, again) and torch.equal(out, eager.sample(batch=batch, seed=n, class_labels=labels))
    described = fast.describe()
    assert described["compiled"] and len(described["compiled_shapes"]) == 20 and not described["notes"]


def test_more_than_eight_samplers_in_one_process_all_compile(backend):
    samplers = [sampler() for _ in range(12)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for n, each in enumerate(samplers, start=1):
            each.sample(batch=2, seed=0)
            assert backend.compiles == n and backend.runs == n * (1 + TABLE.num_steps)  # 1: the warm-up call
    assert all(each.describe()["compiled"] for each in samplers)


def test_compile_failure_is_an_error_when_compile_is_true(monkeypatch):
    monkeypatch.setattr(compile_module, "BACKEND", CountingBackend(fail_on={2}))
    fast = sampler()
    fast.sample(batch=1, seed=0)
    with pytest.raises(Exception, match="compile 2 failed"):
        fast.sample(batch=2, seed=0)


def test_auto_fallback_warns_once_and_keeps_the_compiled_keys(monkeypatch):
    backend = CountingBackend(fail_on={2, 3})
    monkeypatch.setattr(compile_module, "BACKEND", backend)
    fast, eager = sampler(compile="auto"), sampler(compile=False)
    fast.sample(batch=1, seed=0)
    with pytest.warns(RuntimeWarning, match="(?s)torch.compile failed for batch 2 .*compile 2 failed"):
        out = fast.sample(batch=2, seed=0)
    assert torch.equal(out, eager.sample(batch=2, seed=0))  # that key runs eagerly
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one-time: the second fallback is noted, not warned again
        fast.sample(batch=3, seed=0)
        runs = backend.runs
        fast.sample(batch=1, seed=0)  # the key compiled first still runs its compiled code
    assert backend.runs == runs + TABLE.num_steps
    described = fast.describe()
    assert described["compiled"] is False and len(described["notes"]) == 2 and "eager for batch 2" in described["path"]
