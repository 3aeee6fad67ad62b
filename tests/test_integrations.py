"""The framework integrations with the real libraries on tiny models built from configs (no downloads), in-process.

Each framework runs a learning rate that explodes mid-run: the finding arrives within a step and, with
``stop_run`` configured, the framework stops on its own. Plus the two bugs of issue 12: a wrapped optimizer
(Accelerate's ``AcceleratedOptimizer``) just works, and a monitor that sees no gradient says so, once, and where
to call ``monitor.step()``.
"""

from __future__ import annotations

import logging
import os
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gfservice

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")

RUN_NAME = re.compile(r"[A-Za-z0-9_.:\-]{1,128}")  # gfservice.wire.RunName
STOP = {"exploding": {"stop_run": True}, "nonfinite": {"stop_run": True}}
EXPLODE_AT = 12  # the optimizer step whose learning rate is multiplied by 1e4


def _jump(step: int) -> float:
    return 1.0 if step < EXPLODE_AT else 1e4


def _first_alarm(findings):
    alarms = [f for f in findings if f.severity.value in ("warning", "critical")]
    assert alarms, "no finding"
    return min(alarms, key=lambda f: f.first_step)


def _assert_stopped_in_time(first, stopped_at):
    """The jump's effect shows in the gradients of the next step or the one after (LayerNorm absorbs some of it);
    the finding is raised at that very step; the stop verdict follows within one step (the in-process
    aggregator judges off the training thread)."""
    assert first.detector in ("exploding", "nonfinite") and EXPLODE_AT <= first.first_step <= EXPLODE_AT + 2
    assert first.severity.value == "critical", first
    assert stopped_at is not None and first.first_step <= stopped_at <= first.first_step + 1


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 32), torch.nn.Tanh(),
                               torch.nn.Linear(32, 1))


# ---- the two bugs ---------------------------------------------------------------------------------------------
def test_a_wrapped_optimizer_just_works(one_thread):
    from accelerate import Accelerator

    model = _mlp()
    accelerator = Accelerator(cpu=True)
    model, opt = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert not hasattr(opt, "_optimizer_step_pre_hooks")  # the wrapper the issue found crashing the monitor
    mon = gfservice.monitor(model, opt, run="wrapped", service=None, deep_every=2)
    for _ in range(3):
        accelerator.backward(model(torch.randn(16, 8)).pow(2).mean())
        opt.step()
        mon.step()
        opt.zero_grad()
    history = mon.transport.aggregator.history("wrapped")
    mon.close()
    assert mon.errors == 0 and [s.step for s in history] == [0, 1, 2]
    assert history[2].lr == 0.1 and history[2].grads.update_sq is not None  # the hook reached the torch optimizer
    assert history[2].grads.update_sq.sum() > 0


def test_any_optimizer_wrapper_works_even_a_bare_one(one_thread):
    class Bare:  # the least a wrapper may offer: no param_groups, no hooks, the torch optimizer inside
        def __init__(self, inner):
            self._optimizer = inner

        def step(self):
            self._optimizer.step()

    model = _mlp()
    opt = Bare(torch.optim.SGD(model.parameters(), lr=0.1))
    mon = gfservice.monitor(model, opt, run="bare", service=None, deep_every=2)
    for _ in range(3):
        model(torch.randn(16, 8)).pow(2).mean().backward()
        opt.step()
        mon.step()
        model.zero_grad()
    history = mon.transport.aggregator.history("bare")
    mon.close()
    assert mon.errors == 0 and [s.step for s in history] == [0, 1, 2] and history[2].lr is None
    assert history[2].grads.update_sq is not None and history[2].grads.update_sq.sum() > 0


def test_a_monitor_step_after_zero_grad_still_sees_the_backward(one_thread, caplog):
    caplog.set_level(logging.WARNING, logger="gfservice.training.monitoring")
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gfservice.monitor(model, opt, run="late", service=None) as mon:
        for _ in range(3):
            model(torch.randn(16, 8)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            mon.step()  # read at the end of backward: the order no longer matters for the gradients
        assert mon.transport.aggregator.history("late")[-1].grads.count.all()
    assert not caplog.records


@pytest.mark.parametrize("set_to_none", [True, False], ids=["grad-none", "grad-zero"])
def test_no_gradient_at_monitor_step_is_said_once_with_where_to_call_it(one_thread, caplog, set_to_none):
    caplog.set_level(logging.WARNING, logger="gfservice.training.monitoring")
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    mon = gfservice.monitor(model, opt, run="misplaced", service=None)
    for _ in range(12):  # no backward reaches .grad (the gradients live elsewhere, as under DeepSpeed ZeRO)
        for p in model.parameters():
            p.grad = None if set_to_none else torch.zeros_like(p)
        mon.step()
    findings = mon.findings
    mon.close()
    what = "no layer has a gradient" if set_to_none else "every gradient is exactly zero"
    said = [r.getMessage() for r in caplog.records if r.name == "gfservice.training.monitoring"]
    assert len(said) == 1 and "step 0" in said[0] and what in said[0]
    assert "after optimizer.step() and before optimizer.zero_grad()" in said[0]
    (f,) = [f for f in findings if f.detector == "no_gradient"]
    assert f.key == "all" and f.first_step == 9 and "before zero_grad()" in f.message


def test_a_well_placed_monitor_says_nothing(one_thread, caplog):
    caplog.set_level(logging.WARNING, logger="gfservice.training.monitoring")
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gfservice.monitor(model, opt, run="placed", service=None) as mon:
        for _ in range(3):
            model(torch.randn(16, 8)).pow(2).mean().backward()
            opt.step()
            mon.step()
            opt.zero_grad()
    assert not [r for r in caplog.records if "gradient" in r.getMessage()]


# ---- Hugging Face Transformers -----------------------------------------------------------------------------------
def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32))


def _token_rows(n: int = 256, length: int = 16):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (n, length), generator=g)
    return [{"input_ids": row, "labels": row} for row in ids]


def _trainer(tmp_path, callback, max_steps=40, **args):
    from transformers import Trainer, TrainingArguments

    model = _tiny_gpt2()
    targs = TrainingArguments(output_dir=str(tmp_path / "gpt2-tiny"), per_device_train_batch_size=4,
                              max_steps=max_steps, learning_rate=1e-3, report_to="none", save_strategy="no",
                              logging_strategy="no", use_cpu=True, disable_tqdm=True, dataloader_num_workers=0,
                              **args)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _jump)
    return Trainer(model=model, args=targs, train_dataset=_token_rows(), callbacks=[callback], optimizers=(opt, sched))


@pytest.mark.slow
def test_transformers_trainer_stops_itself_when_the_learning_rate_explodes(tmp_path, one_thread):
    from gfservice.integrations.transformers import GradflowCallback

    callback = GradflowCallback(service=None, detectors=STOP)
    trainer = _trainer(tmp_path, callback)  # the Trainer's default clipping (max_grad_norm=1.0): read before it
    trainer.train()
    watch = callback.watch
    first = _first_alarm(callback.monitor.findings)
    _assert_stopped_in_time(first, watch.stopped_at)
    assert trainer.state.global_step == watch.stopped_at + 1  # stopped on its own, right after
    assert watch.closed and watch.stop_reason.startswith(first.detector)


def test_transformers_callback_collects_once_per_optimizer_step_under_accumulation(tmp_path, one_thread):
    from gfservice.integrations.transformers import GradflowCallback

    callback = GradflowCallback(service=None, stop=False)
    trainer = _trainer(tmp_path, callback, max_steps=4, gradient_accumulation_steps=3)
    trainer.train()
    mon = callback.monitor
    history = mon.transport.aggregator.history(mon.run)
    assert [s.step for s in history] == [0, 1, 2, 3]  # one per optimizer step, not per micro-batch
    assert mon.run == "gpt2-tiny"  # from output_dir
    assert all(s.grads.count.all() for s in history)  # the gradients were still there
    assert all(s.loss is not None and 0 < s.loss < 10 for s in history)  # the model's loss, by a forward hook
    assert not trainer.model._forward_hooks  # removed at the end of training
    assert "transformer.h.0.attn.c_attn.weight" in history[0].layers


# ---- PyTorch Lightning -------------------------------------------------------------------------------------------
lightning_warnings = pytest.mark.filterwarnings("ignore::lightning.fabric.utilities.warnings.PossibleUserWarning",
                                                "ignore:.*does not have many workers:UserWarning",
                                                # lightning 2.6 on torch 2.13: its own use of a deprecated pytree API
                                                "ignore:`isinstance.treespec, LeafSpec.` is deprecated:FutureWarning")


def _lightning_module(manual: bool = False):
    import lightning.pytorch as pl

    class Regression(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = _mlp()
            self.automatic_optimization = not manual

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.net(x), y)
            if manual:
                opt = self.optimizers()
                opt.zero_grad()
                self.manual_backward(loss)
                self.clip_gradients(opt, gradient_clip_val=1.0, gradient_clip_algorithm="norm")
                opt.step()
                self.lr_schedulers().step()
            return loss

        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=0.05)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, _jump)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    return Regression()


def _loader(n: int = 512):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 8, generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x[:, :1].sin()), batch_size=8)


def _lightning_trainer(tmp_path, callback, **kw):
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import CSVLogger

    return pl.Trainer(accelerator="cpu", devices=1, max_steps=kw.pop("max_steps", 40), callbacks=[callback],
                      logger=CSVLogger(str(tmp_path), name="regression"), enable_progress_bar=False,
                      enable_checkpointing=False, enable_model_summary=False, **kw)


@lightning_warnings
@pytest.mark.parametrize("manual", [False, True], ids=["automatic", "manual"])
def test_lightning_trainer_stops_itself_when_the_learning_rate_explodes(tmp_path, one_thread, manual):
    from gfservice.integrations.lightning import GradflowCallback

    callback = GradflowCallback(service=None, detectors=STOP)
    clip = {} if manual else {"gradient_clip_val": 1.0}  # manual optimization clips in its training_step
    trainer = _lightning_trainer(tmp_path, callback, **clip)
    trainer.fit(_lightning_module(manual), _loader())
    watch = callback.watch
    _assert_stopped_in_time(_first_alarm(callback.monitor.findings), watch.stopped_at)
    assert trainer.global_step == watch.stopped_at + 1 and trainer.should_stop


@lightning_warnings
def test_lightning_callback_collects_once_per_optimizer_step_with_the_loss(tmp_path, one_thread):
    from gfservice.integrations.lightning import GradflowCallback

    callback = GradflowCallback(service=None, stop=False)
    trainer = _lightning_trainer(tmp_path, callback, max_steps=5, accumulate_grad_batches=3)
    trainer.fit(_lightning_module(), _loader())
    mon = callback.monitor
    history = mon.transport.aggregator.history(mon.run)
    assert [s.step for s in history] == [0, 1, 2, 3, 4]  # one per optimizer step, not per batch
    assert mon.run == "regression-version_0"
    assert all(s.loss is not None and s.grads.count.all() for s in history)
    assert history[0].layers[0] == "net.0.weight"


# ---- Accelerate --------------------------------------------------------------------------------------------------
def _accelerate_run(steps: int, accumulation: int, **options):
    from accelerate import Accelerator

    from gfservice.integrations.accelerate import monitor

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accumulation)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _jump)
    model, opt, sched, loader = accelerator.prepare(model, opt, sched, _loader(steps * accumulation * 8))
    mon = monitor(accelerator, model, opt, run="accel", service=None, **options)
    batches = 0
    for x, y in loader:
        batches += 1
        with accelerator.accumulate(model):
            loss = torch.nn.functional.mse_loss(model(x), y)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            mon.step(loss)
            opt.zero_grad()
        if mon.should_stop:
            break
    history = mon.monitor.transport.aggregator.history("accel")
    mon.close()
    return mon, history, batches


def test_accelerate_collects_only_synchronised_steps_of_the_unwrapped_model(one_thread):
    _, history, batches = _accelerate_run(steps=4, accumulation=2, stop=False)
    assert batches == 8 and [s.step for s in history] == [0, 1, 2, 3]
    assert history[0].layers[0] == "0.weight" and all(s.loss is not None for s in history)


def test_accelerate_loop_stops_when_the_learning_rate_explodes(one_thread):
    mon, _, batches = _accelerate_run(steps=40, accumulation=1, detectors=STOP)
    assert mon.should_stop
    _assert_stopped_in_time(_first_alarm(mon.findings), mon.watch.stopped_at)
    assert batches == mon.watch.stopped_at + 1


# ---- run names from the frameworks: any name the framework holds becomes a valid run name, or none ---------------
@given(name=st.one_of(st.none(), st.text(max_size=300)), version=st.one_of(st.none(), st.integers(0, 10**6),
                                                                          st.text(max_size=50)))
@settings(max_examples=200, deadline=None)
def test_framework_run_names_are_valid_or_absent(name, version):
    from types import SimpleNamespace as NS

    from gfservice.integrations import lightning, transformers

    for got in (lightning.run_name(NS(logger=NS(name=name, version=version))),
                transformers.run_name(NS(run_name=name, output_dir=str(version or ""))),
                transformers.run_name(NS(run_name=None, output_dir=name or ""))):
        assert got is None or RUN_NAME.fullmatch(got), got
