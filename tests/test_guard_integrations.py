"""Guard mode through the framework integrations: the Transformers Trainer, Accelerate and Lightning."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gfservice.training.guard import GuardConfig

NAN_AT = 3


def _nan_output(at: int):
    """A forward hook that makes the ``at``-th forward's loss NaN (a poisoned batch)."""
    calls = [0]

    def hook(module, inputs, output):
        calls[0] += 1
        if calls[0] == at + 1:
            if hasattr(output, "loss"):
                output.loss = output.loss * float("nan")
                return output
            return output * float("nan")
        return None
    return hook


@pytest.mark.slow
def test_the_trainer_callback_with_guard_skips_a_nan_step(tmp_path, one_thread):
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    from gfservice.integrations.transformers import GradflowCallback

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=16))
    model.register_forward_hook(_nan_output(NAN_AT))
    ids = torch.randint(0, 32, (32, 8), generator=torch.Generator().manual_seed(0))
    rows = [{"input_ids": r, "labels": r} for r in ids]
    callback = GradflowCallback(service=None, stop=False, guard=True)
    args = TrainingArguments(output_dir=str(tmp_path / "guard"), per_device_train_batch_size=4, max_steps=6,
                             learning_rate=1e-3, report_to="none", save_strategy="no", logging_steps=1,
                             use_cpu=True, disable_tqdm=True, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=rows, callbacks=[callback])
    trainer.train()
    mon = callback.monitor
    assert mon is not None and [s for s, _ in mon.skipped_steps] == [NAN_AT]
    assert mon.errors == 0
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert trainer.state.global_step == 6


@pytest.mark.slow
def test_accelerate_with_guard_skips_a_nan_step_on_the_wrapped_optimizer(one_thread):
    from accelerate import Accelerator

    from gfservice.integrations.accelerate import monitor

    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, 2)
    model, opt, sched = accelerator.prepare(model, opt, sched)
    model.register_forward_hook(_nan_output(NAN_AT))
    mon = monitor(accelerator, model, opt, run="accel-guard", service=None, stop=False, guard=GuardConfig())
    g = torch.Generator().manual_seed(0)
    for _ in range(8):
        x = torch.randn(16, 8, generator=g)
        loss = model(x).pow(2).mean()
        accelerator.backward(loss)
        opt.step()
        sched.step()
        mon.step(loss)
        opt.zero_grad()
    monitor_ = mon.monitor
    mon.close()
    assert monitor_ is not None and monitor_.skipped_steps == [(NAN_AT, "nonfinite_gradient")]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    inner = opt.optimizer
    assert all(int(s["step"]) == 7 for s in inner.state.values())


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::lightning.fabric.utilities.warnings.PossibleUserWarning",
                            "ignore:.*does not have many workers:UserWarning",
                            # lightning 2.6 on torch 2.13: its own use of a deprecated pytree API
                            "ignore:`isinstance.treespec, LeafSpec.` is deprecated:FutureWarning")
def test_lightning_with_guard_skips_a_nan_step_inside_the_optimizer_closure(tmp_path, one_thread):
    lightning = pytest.importorskip("lightning")

    from gfservice.integrations.lightning import GradflowCallback

    class Module(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))

        def training_step(self, batch, _):
            (x,) = batch
            loss = self.net(x).pow(2).mean()
            return loss * float("nan") if self.global_step == NAN_AT else loss

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    torch.manual_seed(0)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(64, 8)), batch_size=8)
    callback = GradflowCallback(service=None, stop=False, guard=True)
    module = Module()
    trainer = lightning.Trainer(max_steps=6, accelerator="cpu", logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False, callbacks=[callback],
                                default_root_dir=str(tmp_path))
    trainer.fit(module, data)
    mon = callback.monitor
    assert mon is not None and [s for s, _ in mon.skipped_steps] == [NAN_AT]
    assert all(torch.isfinite(p).all() for p in module.parameters())
