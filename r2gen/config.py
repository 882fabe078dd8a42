"""Training configuration and presets: the one place where defaults live.

`iu_xray` and `mimic_cxr` carry the published R2Gen hyper-parameters (train_iu_xray.sh,
train_mimic_cxr.sh and main_train.py's defaults); `tiny` is a small model for CPU smoke runs and
the Quickstart, sized to learn the embedded synthetic set in a few minutes on two cores.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, fields
from typing import Any

from r2gen.errors import ConfigError
from r2gen.wandb_log import WANDB_MODES
from r2gen.model.r2gen import ModelConfig

PRECISIONS = ("fp32", "bf16", "fp16")
STEP_SPEEDUPS = ("channels_last", "cudnn_benchmark", "fused_optimizer", "fused_memory", "cuda_graphs")
"""TrainConfig's switches of the training step's GPU speed-ups (r2gen.speedups), all on by default."""
DEVICES = ("cpu", "cuda")
EVAL_MICRO_BATCHES, EVAL_BATCH_MAX = 4, 256
"""Generation batches: this many training micro-batches, at most this many studies (TrainConfig.eval_batch)."""


RENAMED = {"batch_size": "window_size"}
"""Old TrainConfig field names (in earlier runs' config.json and checkpoints) -> today's."""
_FLAGS = {"window_size": "--effective-batch"}
"""Fields set through a flag of another name (the window is the effective batch over the processes)."""


def _flag(name: str) -> str:
    return _FLAGS.get(name, f"--{name.replace('_', '-')}")


@dataclass(frozen=True)
class TrainConfig:
    """Everything the shared loop needs to reproduce a run (written to the run dir as config.json)."""

    preset: str
    model: ModelConfig
    threshold: int = 3                 # min train count for a word to enter the vocabulary
    image_size: int = 224              # px, square, after the transforms
    window_size: int = 16              # studies per optimizer step on one process (the accumulation window)
    micro_batch: int = 0               # studies per forward/backward; 0 = window_size (no accumulation)
    epochs: int = 100
    lr_ve: float = 5e-5                # visual extractor learning rate
    lr_ed: float = 1e-4                # encoder-decoder learning rate
    weight_decay: float = 5e-5
    amsgrad: bool = True
    warmup_steps: int = 0              # optimizer steps of linear learning-rate warm-up (the plan sets it after a scaled-up rate)
    step_size: int = 50                # StepLR period, epochs
    gamma: float = 0.1                 # StepLR factor
    clip_value: float = 0.1            # clip_grad_value_
    early_stop: int = 50               # epochs without val BLEU_4 improvement before stopping
    val_every: int = 1                 # epochs between evaluations; 0 = only after the last epoch
    beam_size: int = 3
    eval_batch_size: int = 0           # studies per generation batch on val/test; 0 = eval_batch()'s rule
    block_trigrams: bool = True
    reference_generation: bool = False  # evaluate with the published code's step-by-step decoding (A/B runs; same reports, slower)
    seed: int = 9223
    num_workers: int = 2
    pin_memory: bool = True            # page-locked host batches (used on a GPU only)
    prefetch_factor: int = 2           # batches each loader worker prepares ahead
    cache_images: bool = False         # decode every image once into RAM before training
    uint8_images: bool = True          # loaders hand uint8 images to the device, which normalizes them (same values)
    channels_last: bool = True         # GPU, not deepspeed: the visual extractor's convolutions in NHWC (tensor-core layout)
    cudnn_benchmark: bool = True       # GPU: cuDNN times its convolution algorithms once per shape and keeps the fastest
    fused_optimizer: bool = True       # GPU or CPU: Adam's update in one fused kernel (DeepSpeed's offload has its own)
    fused_memory: bool = True          # GPU: the relational memory's token loop in fused Triton kernels (r2gen/fused_memory.py)
    graph_visual_extractor: bool = True  # with cuda_graphs: the whole model's step in the graphs (the memory on a second stream); else the encoder-decoder's
    cuda_graphs: bool = True           # GPU, one process, plain/accelerate: the encoder-decoder's step replayed as CUDA graphs
    max_vram_gib: float = 0.0          # hard cap on this process's GPU memory; 0 = none
    oom_retries: int = 3               # retries at micro-batch 1 before saving and stopping
    max_nonfinite: int = 3             # windows in a row with an inf/NaN loss (skipped) before the run stops
    max_steps_per_epoch: int = 0       # 0 = whole epoch; otherwise cut epochs short (smoke runs)
    log_every: int = 10                # optimizer steps between metrics.jsonl records
    save_every: int = 0                # optimizer steps between resumable checkpoints; 0 = at epoch ends only
    checkpoint_every_min: float = 10.0  # wall minutes between resumable checkpoints at epoch ends; 0 = every epoch
    test_every: int = 0                # epochs between test evaluations; 0 = the best and the last model only
    keep_last: int = 3                 # resumable checkpoints kept (the newest)
    studies: int = 400                 # size of the embedded synthetic set when no ann_path is given
    embedded_epochs: int = 0           # epochs on the embedded set when none are asked for; 0 = epochs
    wandb: bool = False                # also log metrics.jsonl's records and the plan to Weights & Biases
    wandb_mode: str = "offline"        # offline (files under <run>/wandb) or online (needs WANDB_API_KEY)
    wandb_project: str = "r2gen-launch"
    wandb_name: str = ""               # W&B run name; "" = the run directory's name
    tensorboard: bool = False          # also write metrics.jsonl's records as TensorBoard scalars to <run>/tb

    def __post_init__(self) -> None:
        positive = ("threshold", "image_size", "window_size", "epochs", "step_size", "beam_size", "log_every",
                    "keep_last", "max_nonfinite")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{_flag(name)}: must be positive, got {getattr(self, name)}")
        for name in ("lr_ve", "lr_ed", "gamma", "clip_value"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{_flag(name)}: must be positive, got {getattr(self, name)}")
        for name in ("weight_decay", "early_stop", "val_every", "num_workers", "max_steps_per_epoch", "micro_batch",
                     "max_vram_gib", "oom_retries", "eval_batch_size", "save_every", "warmup_steps", "checkpoint_every_min", "test_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{_flag(name)}: must not be negative, got {getattr(self, name)}")
        if self.micro_batch > self.window_size:
            raise ConfigError(f"--micro-batch: the micro-batch {self.micro_batch} is larger than the {self.window_size} "
                              "studies per optimizer step (--effective-batch)")
        if self.prefetch_factor < 1:
            raise ConfigError(f"thresholds: prefetch_factor must be positive, got {self.prefetch_factor}")
        if self.image_size < 32:
            raise ConfigError(f"--image-size: must be at least 32 px, got {self.image_size}")
        if self.wandb_mode not in WANDB_MODES:
            raise ConfigError(f"--wandb-mode: unknown {self.wandb_mode!r}; choose one of {', '.join(WANDB_MODES)}")
        if self.studies < 10:
            raise ConfigError(f"--studies: the synthetic set needs at least 10 studies, got {self.studies}")

    def eval_batch(self, studies: int) -> int:
        """Studies per generation batch on a split of `studies`: eval_batch_size where set, else
        EVAL_MICRO_BATCHES training micro-batches (generation keeps no activations for a backward pass)
        up to EVAL_BATCH_MAX, balanced so that the split's batches have one size (the last one at most
        a few studies smaller): beam search is latency-bound, and each new shape costs cuDNN's autotuning."""
        cap = self.eval_batch_size or min(EVAL_BATCH_MAX, EVAL_MICRO_BATCHES * (self.micro_batch or self.window_size))
        batches = -(-max(studies, 1) // cap)
        return -(-max(studies, 1) // batches)

    def without_speedups(self) -> "TrainConfig":
        """This configuration with the training step's GPU speed-ups off (the plain path, for A/B runs)."""
        return self.replace(**{name: False for name in STEP_SPEEDUPS})

    def replace(self, **changes: Any) -> "TrainConfig":
        """A copy with changes; keys of ModelConfig go to the model."""
        model_keys = {f.name for f in fields(ModelConfig)}
        model_changes = {k: changes.pop(k) for k in list(changes) if k in model_keys}
        try:
            model = dataclasses.replace(self.model, **model_changes) if model_changes else self.model
        except ValueError as err:
            raise ConfigError(str(err)) from None
        return dataclasses.replace(self, model=model, **changes)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        """A config as to_dict wrote it; runs from before a field's rename store its old name."""
        data = {RENAMED.get(key, key): value for key, value in data.items()}
        return cls(model=ModelConfig(**data.pop("model")), **data)


PRESETS: dict[str, TrainConfig] = {
    # iu_xray on the embedded set: 3000 studies (2100 train), enough for the pictures to be learned rather
    # than the most frequent report (280 train studies were not: the constant report's scores), and 30
    # epochs there (the paper's 100 are for IU X-Ray's own data).
    "iu_xray": TrainConfig(preset="iu_xray", model=ModelConfig(dataset="iu_xray", max_seq_length=60),
                           threshold=3, epochs=100, step_size=50, gamma=0.1, seed=9223, studies=3000,
                           embedded_epochs=30),  # val findings F1 0.93 at epoch 28 on an H200 (docs/measurements.md)
    "mimic_cxr": TrainConfig(preset="mimic_cxr", model=ModelConfig(dataset="mimic_cxr", max_seq_length=100),
                             threshold=10, epochs=30, step_size=1, gamma=0.8, seed=456789),
    # tiny: for 2 CPU cores, the embedded set's findings learned in ~6 minutes: 1500 studies at 32 px,
    # batch 32 (a CPU step's fixed cost spread over more studies: 19 vs 12 studies/s at batch 8), rates
    # scaled up with it for a randomly initialized ResNet-18, the last epoch at a tenth of them, light
    # dropout. Chosen on a grid on the v2 set (docs/measurements.md).
    "tiny": TrainConfig(
        preset="tiny",
        model=ModelConfig(dataset="iu_xray", backbone="resnet18", d_model=128, d_ff=128, num_heads=4,
                          num_layers=1, drop_prob_lm=0.1, rm_num_slots=3, rm_num_heads=4, rm_d_model=128,
                          max_seq_length=60),
        threshold=3, image_size=32, window_size=32, epochs=6, lr_ve=4e-3, lr_ed=2e-3, step_size=5,
        gamma=0.1, val_every=0, seed=9223, early_stop=50, studies=1500,
        checkpoint_every_min=0.0),  # every epoch: its states are small (0.2 GB, ~1% of a 2-core CPU epoch)
}
"""Named starting points; command-line options override single fields."""


def preset(name: str) -> TrainConfig:
    if name not in PRESETS:
        raise ConfigError(f"--preset: unknown {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]

