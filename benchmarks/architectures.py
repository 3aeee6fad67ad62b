"""Real-architecture sweep: tiny `transformers` models, trained healthy or with a fault, every detector at its defaults.

```bash
.venv/bin/python benchmarks/architectures.py                   # every architecture and fault: a few minutes on 2 cores
.venv/bin/python benchmarks/architectures.py --quick           # a handful: under a minute
.venv/bin/python benchmarks/architectures.py --only llama,vit,vit:nan_batch --json out.json
.venv/bin/python benchmarks/architectures.py --list
.venv/bin/python benchmarks/architectures.py --guard           # the same with guard=True: every skip counted
```

Each architecture is built offline from its `transformers` config class (tiny, random init, no download) and
trained on synthetic data with a learnable signal (token sequences that follow a fixed permutation, images
carrying a class template, audio features carrying a class pattern) at its family's usual settings: AdamW with a
linear warm-up, weight decay, and gradient clipping where the family clips (1.0 for language models and ViT, 5.0
for Swin, none for the convolutional networks, CLIP and wav2vec2). ``timm`` and ``torchvision`` are not used:
timm imports torchvision, whose wheel may be a CUDA build that breaks the CPU torch.

The monitor is the public one, ``gfservice.monitor(model, optimizer, run=..., service=None)`` with every
detector at its defaults, and ``monitor.step(loss=loss)`` after ``optimizer.step()``. Scoring follows
``benchmarks/detection.py``: a warning/critical finding is an alarm; a healthy run must raise none; a run with a
fault must raise the expected detector's alarm at or after the onset and within its budget (``nonfinite``:
critical at the very step; ``exploding``: within 10 steps and before the first non-finite value), and nothing
before the onset. Faults:

- ``lr_jump``: the learning rate of every group jumps 1000x at the onset, clipping left on (the monitor reads the
  gradients at the end of backward, before ``clip_grad_norm_``: clipping does not hide the explosion);
- ``nan_batch``: one batch carries a NaN input value;
- ``huge_batch``: one corrupted batch with inputs 1e4x their scale (pixels not normalised, say).

The output is a Markdown table (architecture, family, parameters, steps, alarms with their first step, verdict)
and a summary line; ``--json PATH`` writes the raw results too. With ``--guard`` every monitor is
``gfservice.monitor(..., guard=True)`` (guard mode at its defaults): the steps it skipped are listed per run, and
a healthy run must skip none (a skip is a false skip; the learning-rate fault's own steps are the guard's to skip).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

import gfservice

if __package__:  # imported as benchmarks.architectures
    from .detection import TARGETS, Target
else:  # run as a script: benchmarks/ is on sys.path
    from detection import TARGETS, Target  # type: ignore[no-redef]

Batch = dict[str, Tensor]
VOCAB, SEQ, BATCH = 64, 16, 8
CLASSES, IMAGE = 4, 32


# ---- synthetic data with a learnable signal ------------------------------------------------------------------
def token_sequences(seed: int, step: int, n: int = BATCH, length: int = SEQ) -> Tensor:
    """Sequences in which each token follows from the one before by the run's fixed permutation (ids 4 and up)."""
    g = torch.Generator().manual_seed(seed * 100_003 + step)
    perm = 4 + torch.randperm(VOCAB - 4, generator=torch.Generator().manual_seed(1000 + seed))  # ids 0-3: special
    out = torch.empty(n, length, dtype=torch.long)
    out[:, 0] = torch.randint(4, VOCAB, (n,), generator=g)
    for t in range(1, length):
        out[:, t] = perm[out[:, t - 1] - 4]
    return out


def templates(seed: int, shape: tuple[int, ...]) -> Tensor:
    """One fixed random pattern per class."""
    return torch.randn((CLASSES, *shape), generator=torch.Generator().manual_seed(2000 + seed))


def pattern_batch(seed: int, step: int, shape: tuple[int, ...], n: int = BATCH) -> tuple[Tensor, Tensor]:
    """Inputs ``template[label] + noise`` and their labels."""
    g = torch.Generator().manual_seed(seed * 100_003 + step)
    labels = torch.randint(0, CLASSES, (n,), generator=g)
    x = templates(seed, shape)[labels] + torch.randn((n, *shape), generator=g)
    return x, labels


# ---- architectures -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Recipe:
    """A family's usual optimisation settings."""

    lr: float
    weight_decay: float
    clip: float | None
    warmup: int = 10
    betas: tuple[float, float] = (0.9, 0.999)


LLM = Recipe(lr=1e-3, weight_decay=0.1, clip=1.0, betas=(0.9, 0.95))  # Llama/GPT pretraining, scaled to tiny
ENCODER = Recipe(lr=2e-3, weight_decay=0.01, clip=1.0)  # BERT-style (the Trainer's max_grad_norm=1.0), tiny size
SEQ2SEQ = Recipe(lr=1e-3, weight_decay=0.01, clip=1.0)
VIT = Recipe(lr=1e-3, weight_decay=0.05, clip=1.0)  # ViT/DeiT/BEiT clip at 1.0
SWIN = Recipe(lr=1e-3, weight_decay=0.05, clip=5.0)  # Swin's recipe clips at 5.0
CNN = Recipe(lr=2e-3, weight_decay=0.05, clip=None)  # ResNet/ConvNeXt/EfficientNet with AdamW, no clipping
CONTRASTIVE = Recipe(lr=5e-4, weight_decay=0.1, clip=None, betas=(0.9, 0.98))  # CLIP
AUDIO = Recipe(lr=5e-4, weight_decay=0.01, clip=1.0)  # Whisper/wav2vec2 fine-tuning under the Trainer


@dataclass
class Model:
    """A built architecture: the module, a batch for each step and the loss of a batch."""

    module: nn.Module
    batch: Callable[[int], Batch]
    loss: Callable[[nn.Module, Batch], Tensor]
    #: The floating-point input a NaN or huge-input fault corrupts (None: token ids only).
    float_input: str | None = None


@dataclass(frozen=True)
class Arch:
    name: str
    family: str
    recipe: Recipe
    build: Callable[[int], Model]
    steps: int = 150
    quick: bool = False


def _hf_loss(model: nn.Module, batch: Batch) -> Tensor:
    return model(**batch).loss


def causal_lm(config_cls: str, **kw: Any) -> Callable[[int], Model]:
    def build(seed: int) -> Model:
        import transformers

        cfg = getattr(transformers, config_cls)(vocab_size=VOCAB, **kw)
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(cfg)

        def batch(step: int) -> Batch:
            ids = token_sequences(seed, step)
            return {"input_ids": ids, "labels": ids}

        return Model(model, batch, _hf_loss)

    return build


def masked_lm(config_cls: str, **kw: Any) -> Callable[[int], Model]:
    def build(seed: int) -> Model:
        import transformers

        cfg = getattr(transformers, config_cls)(vocab_size=VOCAB, **kw)
        torch.manual_seed(seed)
        model = transformers.AutoModelForMaskedLM.from_config(cfg)

        def batch(step: int) -> Batch:
            ids = token_sequences(seed, step)
            g = torch.Generator().manual_seed(seed * 31 + step)
            mask = torch.rand(ids.shape, generator=g) < 0.25
            labels = torch.where(mask, ids, torch.full_like(ids, -100))
            return {"input_ids": torch.where(mask, torch.ones_like(ids), ids), "labels": labels}

        return Model(model, batch, _hf_loss)

    return build


def seq2seq(config_cls: str, **kw: Any) -> Callable[[int], Model]:
    def build(seed: int) -> Model:
        import transformers

        cfg = getattr(transformers, config_cls)(vocab_size=VOCAB, pad_token_id=0, decoder_start_token_id=2,
                                                bos_token_id=2, eos_token_id=3, **kw)
        torch.manual_seed(seed)
        model = transformers.AutoModelForSeq2SeqLM.from_config(cfg)

        def batch(step: int) -> Batch:
            ids = token_sequences(seed, step)
            return {"input_ids": ids, "labels": ids.flip(1)}  # learn to reverse the sequence

        return Model(model, batch, _hf_loss)

    return build


def image_classifier(config_cls: str, model_cls: str | None = None, channels: int = 3, size: int = IMAGE,
                     **kw: Any) -> Callable[[int], Model]:
    def build(seed: int) -> Model:
        import transformers

        cfg = getattr(transformers, config_cls)(num_labels=CLASSES, num_channels=channels, **kw)
        torch.manual_seed(seed)
        model = (getattr(transformers, model_cls)(cfg) if model_cls
                 else transformers.AutoModelForImageClassification.from_config(cfg))
        batchnorm_weights(model, nn.init.ones_)  # the usual init (transformers' EfficientNet draws N(0, 0.02))

        def batch(step: int) -> Batch:
            x, y = pattern_batch(seed, step, (channels, size, size))
            return {"pixel_values": x, "labels": y}

        return Model(model, batch, _hf_loss, float_input="pixel_values")

    return build


def clip_model(seed: int) -> Model:
    import transformers

    cfg = transformers.CLIPConfig(
        text_config={"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "max_position_embeddings": SEQ},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": IMAGE, "patch_size": 8},
        projection_dim=32)
    torch.manual_seed(seed)
    model = transformers.CLIPModel(cfg)

    def batch(step: int) -> Batch:
        x, y = pattern_batch(seed, step, (3, IMAGE, IMAGE), n=CLASSES * 2)
        # A caption per class: a fixed sequence that starts with the class's token (pairs in a batch may repeat).
        ids = token_sequences(seed, 999_999, n=CLASSES, length=8)[y]
        return {"input_ids": ids, "pixel_values": x, "return_loss": torch.tensor(True)}

    def loss(m: nn.Module, b: Batch) -> Tensor:
        return m(input_ids=b["input_ids"], pixel_values=b["pixel_values"], return_loss=True).loss

    return Model(model, batch, loss, float_input="pixel_values")


def whisper(seed: int) -> Model:
    import transformers

    mels, frames = 16, 32
    cfg = transformers.WhisperConfig(
        vocab_size=VOCAB, num_mel_bins=mels, d_model=32, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
        max_source_positions=frames // 2, max_target_positions=SEQ, pad_token_id=0, decoder_start_token_id=2,
        bos_token_id=2, eos_token_id=3, suppress_tokens=[], begin_suppress_tokens=[])
    torch.manual_seed(seed)
    model = transformers.WhisperForConditionalGeneration(cfg)
    transcripts = token_sequences(seed, 999_999, n=CLASSES, length=8)

    def batch(step: int) -> Batch:
        x, y = pattern_batch(seed, step, (mels, frames))
        return {"input_features": x, "labels": transcripts[y]}

    return Model(model, batch, _hf_loss, float_input="input_features")


def wav2vec2(seed: int) -> Model:
    import transformers

    cfg = transformers.Wav2Vec2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        conv_dim=(16, 16), conv_stride=(5, 4), conv_kernel=(10, 4), num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4, num_labels=CLASSES, mask_time_prob=0.0, classifier_proj_size=16)
    torch.manual_seed(seed)
    model = transformers.Wav2Vec2ForSequenceClassification(cfg)

    def batch(step: int) -> Batch:
        x, y = pattern_batch(seed, step, (800,))
        return {"input_values": x, "labels": y}

    return Model(model, batch, _hf_loss, float_input="input_values")


TINY_LM = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2, "max_position_embeddings": 64}
TINY_ENC = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "max_position_embeddings": 64}
TINY_VIT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "image_size": IMAGE, "patch_size": 8}
MOE = {"num_local_experts": 4, "num_experts_per_tok": 2}

ARCHS: list[Arch] = [
    # decoder-only language models
    Arch("llama", "decoder LM", LLM, causal_lm("LlamaConfig", **TINY_LM), quick=True),
    Arch("mistral", "decoder LM", LLM, causal_lm("MistralConfig", **TINY_LM)),
    Arch("qwen2", "decoder LM", LLM, causal_lm("Qwen2Config", **TINY_LM)),
    Arch("gemma", "decoder LM", LLM, causal_lm("GemmaConfig", head_dim=8, **TINY_LM)),
    Arch("phi", "decoder LM", LLM, causal_lm("PhiConfig", **{k: v for k, v in TINY_LM.items()
                                                          if k != "num_key_value_heads"})),
    Arch("gpt2", "decoder LM", LLM, causal_lm("GPT2Config", n_embd=32, n_layer=2, n_head=4, n_positions=64),
         quick=True),
    Arch("gpt_neox", "decoder LM", LLM, causal_lm("GPTNeoXConfig", hidden_size=32, intermediate_size=64,
                                                   num_hidden_layers=2, num_attention_heads=4,
                                                   max_position_embeddings=64)),
    Arch("opt", "decoder LM", LLM, causal_lm("OPTConfig", hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                              num_attention_heads=4, max_position_embeddings=64,
                                              word_embed_proj_dim=32)),
    Arch("bloom", "decoder LM", LLM, causal_lm("BloomConfig", hidden_size=32, n_layer=2, n_head=4)),
    Arch("falcon", "decoder LM", LLM, causal_lm("FalconConfig", hidden_size=32, num_hidden_layers=2,
                                                 num_attention_heads=4)),
    # mixture-of-experts language models
    Arch("mixtral", "MoE LM", LLM, causal_lm("MixtralConfig", **TINY_LM, **MOE), quick=True),
    Arch("qwen2_moe", "MoE LM", LLM, causal_lm("Qwen2MoeConfig", **TINY_LM, num_experts=4, num_experts_per_tok=2,
                                                moe_intermediate_size=32, shared_expert_intermediate_size=64)),
    Arch("olmoe", "MoE LM", LLM, causal_lm("OlmoeConfig", **TINY_LM, num_experts=4, num_experts_per_tok=2)),
    # encoders (masked language modelling)
    Arch("bert", "encoder", ENCODER, masked_lm("BertConfig", **TINY_ENC), quick=True),
    Arch("roberta", "encoder", ENCODER, masked_lm("RobertaConfig", pad_token_id=0, **TINY_ENC)),
    Arch("distilbert", "encoder", ENCODER, masked_lm("DistilBertConfig", dim=32, hidden_dim=64, n_layers=2,
                                                      n_heads=4, max_position_embeddings=64)),
    Arch("albert", "encoder", ENCODER, masked_lm("AlbertConfig", embedding_size=16, **TINY_ENC)),
    Arch("electra", "encoder", ENCODER, masked_lm("ElectraConfig", embedding_size=16, **TINY_ENC)),
    Arch("deberta_v2", "encoder", ENCODER, masked_lm("DebertaV2Config", **TINY_ENC)),
    # encoder-decoders
    Arch("t5", "seq2seq", SEQ2SEQ, seq2seq("T5Config", d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=4)),
    Arch("bart", "seq2seq", SEQ2SEQ, seq2seq("BartConfig", d_model=32, encoder_layers=2, decoder_layers=2,
                                              encoder_attention_heads=4, decoder_attention_heads=4,
                                              encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64)),
    # vision transformers
    Arch("vit", "vision transformer", VIT, image_classifier("ViTConfig", **TINY_VIT), quick=True),
    Arch("deit", "vision transformer", VIT, image_classifier("DeiTConfig", "DeiTForImageClassification", **TINY_VIT)),
    Arch("beit", "vision transformer", VIT, image_classifier("BeitConfig", use_mean_pooling=True, **TINY_VIT)),
    Arch("dinov2", "vision transformer", VIT, image_classifier("Dinov2Config", **{k: v for k, v in TINY_VIT.items()
                                                                               if k != "intermediate_size"})),
    Arch("swin", "vision transformer", SWIN, image_classifier("SwinConfig", embed_dim=16, depths=[1, 1],
                                                               num_heads=[2, 2], window_size=4, patch_size=4,
                                                               image_size=IMAGE)),
    # convolutional networks
    Arch("resnet", "CNN", CNN, image_classifier("ResNetConfig", embedding_size=16, hidden_sizes=[16, 32],
                                                 depths=[1, 1], layer_type="basic"), quick=True),
    Arch("regnet", "CNN", CNN, image_classifier("RegNetConfig", embedding_size=16, hidden_sizes=[16, 32],
                                                 depths=[1, 1], groups_width=8)),
    Arch("convnext", "CNN", CNN, image_classifier("ConvNextConfig", hidden_sizes=[16, 32], depths=[1, 1],
                                                   num_stages=2)),
    Arch("mobilenet_v2", "CNN", CNN, image_classifier("MobileNetV2Config", depth_multiplier=0.25,
                                                       image_size=IMAGE)),
    Arch("efficientnet", "CNN", CNN, image_classifier("EfficientNetConfig", width_coefficient=0.1,
                                                       depth_coefficient=0.1, image_size=IMAGE,
                                                       hidden_dim=128)),
    # multimodal and audio
    Arch("clip", "multimodal", CONTRASTIVE, clip_model),
    Arch("whisper", "audio seq2seq", AUDIO, whisper),
    Arch("wav2vec2", "audio encoder", AUDIO, wav2vec2),
]


# ---- faults ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Fault:
    """What goes wrong from step ``at``, and the detector that must say so (None: nothing may fire)."""

    name: str
    expected: str | None
    at: int = 50
    description: str = ""


FAULTS = {f.name: f for f in (
    Fault("lr_jump", "exploding", description="learning rate x1000 at the onset, clipping left on"),
    Fault("nan_batch", "nonfinite", description="one NaN input value in the onset's batch"),
    Fault("huge_batch", None, description="the onset's inputs x1e4: absorbed by the normalisation layers (the "
          "pre-clip gradient norm moves 0.9-3.2x on ViT, ResNet, ConvNeXt and Whisper), so nothing may fire"),
    Fault("bn_init", "vanishing", at=0, description="BatchNorm weights drawn from N(0, 0.02) instead of 1 (what "
          "transformers 5.x's EfficientNet _init_weights does): each norm layer shrinks the signal ~50x"),
)}
#: The faulty runs: architecture -> faults injected into it.
FAULTY: dict[str, tuple[str, ...]] = {
    "llama": ("lr_jump",), "gpt2": ("lr_jump",), "mixtral": ("lr_jump",), "bert": ("lr_jump",), "t5": ("lr_jump",),
    "vit": ("lr_jump", "nan_batch", "huge_batch"), "resnet": ("lr_jump", "nan_batch", "huge_batch"),
    "convnext": ("nan_batch", "huge_batch"), "whisper": ("nan_batch", "huge_batch"), "efficientnet": ("bn_init",),
}


def batchnorm_weights(model: nn.Module, fill: Callable[[Tensor], Any]) -> None:
    """Apply ``fill`` to the weight of every BatchNorm layer of ``model``."""
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.weight is not None:
                fill(mod.weight)


# ---- training and scoring --------------------------------------------------------------------------------------
@dataclass
class Result:
    run: str
    arch: str
    family: str
    fault: str | None
    params: int
    steps: int
    clip: float | None
    onset: int | None = None
    expected: str | None = None
    alarms: dict[str, int] = field(default_factory=dict)  # detector -> first step of a warning/critical finding
    first_nonfinite: int | None = None
    #: Ground truth: the largest pre-clip global gradient norm of the 10 steps from the onset over the median of
    #: the 10 steps before it (an explosion hidden by clipping shows here, not in the monitor's post-clip view).
    grad_jump: float | str | None = None
    fired: int | None = None
    deadline: int | None = None
    verdict: str = ""
    why: str = ""
    messages: list[dict[str, Any]] = field(default_factory=list)
    loss_first: float | str = 0.0
    loss_last: float | str = 0.0
    wall_s: float = 0.0
    monitor_errors: int = 0
    #: With ``--guard``: the steps guard mode skipped, with their reasons.
    skipped: list[tuple[int, str]] = field(default_factory=list)


def _num(x: float) -> float | str:
    return float(f"{x:.4g}") if math.isfinite(x) else str(x)


def _first(f: Any) -> int:
    return int(f.first_step if f.first_step is not None else f.step)


def warmup_schedule(opt: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then linear decay to 10% (the Trainer's default shape)."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.1, 1.0 - 0.9 * (step - warmup) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _corrupt(fault: Fault, model: Model, batch: Batch) -> Batch:
    key = model.float_input
    if key is None:
        raise ValueError(f"{fault.name} needs a floating-point input")
    x = batch[key].clone()
    if fault.name == "nan_batch":
        x.view(-1)[len(x.view(-1)) // 3] = float("nan")
    else:
        x *= 1e4
    return {**batch, key: x}


def train(arch: Arch, fault: Fault | None = None, seed: int = 0, steps: int | None = None,
          guard: bool = False) -> Result:
    """Train ``arch`` (with ``fault`` injected) under a monitor with every detector at its defaults; score it."""
    t0 = time.perf_counter()
    steps = steps or arch.steps
    m = arch.build(seed)
    model, recipe = m.module, arch.recipe
    if fault is not None and fault.name == "bn_init":
        batchnorm_weights(model, lambda w: nn.init.normal_(w, 0.0, 0.02))
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "emb" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "emb" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=recipe.lr, betas=recipe.betas)
    sched = warmup_schedule(opt, recipe.warmup, steps)
    name = arch.name + (f":{fault.name}" if fault else "")
    res = Result(name, arch.name, arch.family, fault.name if fault else None,
                 sum(p.numel() for p in model.parameters()), steps, recipe.clip)
    mon = gfservice.monitor(model, opt, run=name, service=None, guard=guard or None)
    losses: list[float] = []
    norms: list[float] = []
    for i in range(steps):
        batch = m.batch(i)
        if fault is not None and i == fault.at and fault.name != "bn_init":
            if fault.name == "lr_jump":
                for group in opt.param_groups:
                    group["lr"] *= 1000.0
                sched.base_lrs = [lr * 1000.0 for lr in sched.base_lrs]
            else:
                batch = _corrupt(fault, m, batch)
        loss = m.loss(model, batch)
        loss.backward()
        if res.first_nonfinite is None:
            finite = bool(torch.isfinite(loss)) and all(
                bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None)
            if not finite:
                res.first_nonfinite = i
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if recipe.clip:
            norms.append(float(nn.utils.clip_grad_norm_(model.parameters(), recipe.clip)))
        else:
            norms.append(float(nn.utils.get_total_norm(grads)))
        opt.step()
        mon.step(loss=loss)
        mon.transport.flush()  # every step judged, however loaded the machine (see benchmarks/detection.py)
        opt.zero_grad(set_to_none=True)
        sched.step()
        losses.append(float(loss.detach()))
    findings = sorted((f for f in mon.findings if f.severity.value != "info"), key=_first)
    res.monitor_errors = mon.errors
    res.skipped = list(mon.skipped_steps)
    mon.close()
    for f in findings:
        res.alarms.setdefault(f.detector, _first(f))
    res.messages = [{"detector": f.detector, "severity": f.severity.value, "step": _first(f),
                     "message": f.message} for f in findings]
    res.loss_first, res.loss_last = _num(losses[0]), _num(sum(losses[-10:]) / len(losses[-10:]))
    if fault is not None and fault.at >= 10:
        before = sorted(norms[fault.at - 10: fault.at])[5]
        res.grad_jump = _num(max(norms[fault.at: fault.at + 10]) / before)
    score(res, fault, findings)
    res.wall_s = round(time.perf_counter() - t0, 2)
    return res


def score(res: Result, fault: Fault | None, alarms: Sequence[Any]) -> None:
    """The verdict of ``res`` from its alarms (warning/critical findings, sorted by first step)."""
    if fault is not None:
        res.onset, res.expected = fault.at, fault.expected
    if fault is None or fault.expected is None:
        res.verdict = "FALSE-ALARM" if alarms else "PASS"
        res.why = ", ".join(sorted({f.detector for f in alarms}))
        return
    target = TARGETS.get(fault.expected, Target("within 20 steps", steps=20))
    deadline = target.deadline(fault.at, 0)
    if target.before_nonfinite and res.first_nonfinite is not None and res.first_nonfinite >= fault.at:
        deadline = min(deadline, res.first_nonfinite - 1)
    res.deadline = deadline
    mine = [f for f in alarms if f.detector == fault.expected and _first(f) >= fault.at
            and (not target.critical or f.severity.value == "critical")]
    res.fired = _first(mine[0]) if mine else None
    early = [f for f in alarms if _first(f) < fault.at]
    why = []
    if res.fired is None:
        why.append(f"{fault.expected} not raised" + (" (critical)" if target.critical else ""))
    elif res.fired > deadline:
        why.append(f"{fault.expected} late: +{res.fired - fault.at}, deadline +{deadline - fault.at}")
    if early:
        why.append(f"{early[0].detector} before the onset (step {_first(early[0])})")
    res.verdict = "PASS" if not why else ("FALSE-ALARM" if early and res.fired is not None
                                          and res.fired <= deadline else "MISS")
    res.why = "; ".join(why)


# ---- reporting -------------------------------------------------------------------------------------------------
def _params(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.0f}k"


def table(results: Sequence[Result]) -> str:
    head = ["architecture", "family", "params", "clip", "steps", "fault (onset)", "grad jump", "expected",
            "alarms (first step)",
            "first step", "loss", "verdict", "note"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        alarms = ", ".join(f"{d}@{s}" for d, s in sorted(r.alarms.items(), key=lambda kv: kv[1])) or "-"
        first = min(r.alarms.values()) if r.alarms else None
        cells = [r.arch, r.family, _params(r.params), "-" if r.clip is None else f"{r.clip:g}", str(r.steps),
                 f"{r.fault} ({r.onset})" if r.fault else "-", "-" if r.grad_jump is None else f"{_g(r.grad_jump)}x",
                 r.expected or "-", alarms,
                 "-" if first is None else str(first), f"{_g(r.loss_first)} -> {_g(r.loss_last)}",
                 r.verdict if r.verdict == "PASS" else f"**{r.verdict}**", r.why]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _g(x: float | str) -> str:
    return f"{x:.3g}" if isinstance(x, float) else x


def summary(results: Sequence[Result], wall_s: float) -> dict[str, Any]:
    healthy = [r for r in results if r.fault is None]
    faulty = [r for r in results if r.fault is not None and r.expected is not None]
    return {
        "runs": len(results),
        "architectures": len({r.arch for r in results}),
        "healthy_runs": len(healthy),
        "healthy_with_alarms": sum(r.verdict != "PASS" for r in healthy),
        "healthy_steps": sum(r.steps for r in healthy),
        "false_alarms": sum(len(r.alarms) for r in healthy),
        "faulty_false_alarms": sum(1 for r in faulty if r.verdict == "FALSE-ALARM"),
        "false_alarms_by_detector": {d: sum(d in r.alarms for r in healthy)
                                     for d in sorted({d for r in healthy for d in r.alarms})},
        "faulty_runs": len(faulty),
        "detected": sum(r.fired is not None and r.deadline is not None and r.fired <= r.deadline for r in faulty),
        "passed": sum(r.verdict == "PASS" for r in results),
        "monitor_errors": sum(r.monitor_errors for r in results),
        "guard_false_skips": sum(len(r.skipped) for r in healthy),
        "wall_s": round(wall_s, 1),
    }


def summary_line(s: dict[str, Any]) -> str:
    by_det = ", ".join(f"{d} {n}" for d, n in s["false_alarms_by_detector"].items()) or "none"
    return (f"{s['architectures']} architectures: {s['healthy_runs'] - s['healthy_with_alarms']}/{s['healthy_runs']} "
            f"healthy runs quiet ({s['false_alarms']} false alarms in {s['healthy_steps']} healthy steps; by "
            f"detector: {by_det}); faults found in budget {s['detected']}/{s['faulty_runs']}; faulty runs with a "
            f"false alarm {s['faulty_false_alarms']}; {s['passed']}/{s['runs']} runs PASS; monitor errors "
            f"{s['monitor_errors']}; {s['wall_s']} s")


def plan(only: str | None = None, quick: bool = False) -> list[tuple[Arch, Fault | None]]:
    """The runs to do: ``only`` names architectures (``vit``) and faulty runs (``vit:nan_batch``)."""
    by_name = {a.name: a for a in ARCHS}
    if only:
        runs: list[tuple[Arch, Fault | None]] = []
        for item in only.split(","):
            arch, _, fault = item.partition(":")
            if arch not in by_name or (fault and fault not in FAULTS):
                raise ValueError(f"unknown run {item!r}; --list shows them")
            runs.append((by_name[arch], FAULTS[fault] if fault else None))
        return runs
    chosen = [a for a in ARCHS if a.quick or not quick]
    runs = [(a, None) for a in chosen]
    faulty = [("vit", "nan_batch"), ("llama", "lr_jump")] if quick else [
        (a, f) for a, fs in FAULTY.items() for f in fs]
    return runs + [(by_name[a], FAULTS[f]) for a, f in faulty]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="a handful of architectures and faults (under a minute)")
    ap.add_argument("--only", help="comma-separated runs: an architecture (llama) or a faulty run (vit:nan_batch)")
    ap.add_argument("--steps", type=int, help="steps per run (default: the architecture's)")
    ap.add_argument("--json", help="write the results and the summary to this file")
    ap.add_argument("--list", action="store_true", help="list the architectures and faults and exit")
    ap.add_argument("--guard", action="store_true", help="guard mode on (guard=True): count the steps it skips")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.list:
        for a in ARCHS:
            print(f"{a.name:14} {a.family:20} {a.steps:4} steps  faults: {', '.join(FAULTY.get(a.name, ())) or '-'}")
        return 0
    try:
        runs = plan(args.only, args.quick)
    except ValueError as exc:
        ap.error(str(exc))
    import transformers

    transformers.logging.set_verbosity_error()
    t0 = time.perf_counter()
    results: list[Result] = []
    for i, (arch, fault) in enumerate(runs):
        r = train(arch, fault, steps=args.steps, guard=args.guard)
        results.append(r)
        skips = f" skipped {r.skipped}" if args.guard else ""
        print(f"[{i + 1}/{len(runs)}] {r.run}: {r.verdict} {r.why}{skips} ({r.wall_s:.1f} s)", file=sys.stderr,
              flush=True)
    s = summary(results, time.perf_counter() - t0)
    print(table(results))
    print()
    alarms = [f"- {r.run} / {m['detector']} [{m['severity']}] step {m['step']}: {m['message'][:200]}"
              for r in results for m in r.messages if r.verdict != "PASS"]
    if alarms:
        print("Alarms on runs that did not pass:\n" + "\n".join(alarms) + "\n")
    print(summary_line(s))
    if args.guard:
        print(f"guard: {s['guard_false_skips']} steps skipped on {s['healthy_runs']} healthy runs "
              f"({s['healthy_steps']} steps); on the faulty runs: "
              + "; ".join(f"{r.run} {[st for st, _ in r.skipped]}" for r in results if r.fault is not None))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"summary": s, "args": vars(args), "results": [asdict(r) for r in results]}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
