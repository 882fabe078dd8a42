"""R2GenModel: visual extractor + memory-driven Transformer, faithful to zhjohnchan/R2Gen.

Plain PyTorch with no backend knowledge. IU X-Ray studies have two views whose patch features
(2 x 49) and pooled features are concatenated; MIMIC-CXR studies have one view.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from r2gen.model.transformer import make_transformer, subsequent_mask
from r2gen.model.visual_extractor import BACKBONES, VisualExtractor

DATASETS: dict[str, int] = {"iu_xray": 2, "mimic_cxr": 1}
"""Data set name -> views per study."""


@dataclass(frozen=True)
class ModelConfig:
    """Model hyper-parameters; the defaults are the published R2Gen ones."""

    dataset: str = "iu_xray"
    backbone: str = "resnet101"
    d_model: int = 512
    d_ff: int = 512
    num_heads: int = 8
    num_layers: int = 3
    dropout: float = 0.1
    drop_prob_lm: float = 0.5
    rm_num_slots: int = 3
    rm_num_heads: int = 8
    rm_d_model: int = 512
    max_seq_length: int = 60

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset: unknown {self.dataset!r}; choose one of {', '.join(DATASETS)}")
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone: unknown {self.backbone!r}; choose one of {', '.join(BACKBONES)}")
        for name in ("d_model", "d_ff", "num_heads", "num_layers", "rm_num_slots", "rm_num_heads",
                     "rm_d_model", "max_seq_length"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be positive, got {getattr(self, name)}")
        if self.d_model % self.num_heads or self.rm_d_model % self.rm_num_heads:
            raise ValueError("d_model and rm_d_model must be divisible by their head counts")
        if self.rm_d_model != self.d_model:
            # The published conditional layer norm adds rm_d_model-wide shifts to d_model-wide gammas.
            raise ValueError("rm_d_model must equal d_model (as in R2Gen's conditional layer norm)")

    @property
    def d_vf(self) -> int:
        """Channels of the visual features (2048 for ResNet-101)."""
        return BACKBONES[self.backbone]

    @property
    def num_views(self) -> int:
        return DATASETS[self.dataset]

    def to_dict(self) -> dict:
        return asdict(self)


class EncoderDecoder(nn.Module):
    """R2Gen's EncoderDecoder parameters: att_embed, the Transformer and the output projection."""

    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        self.att_embed = nn.Sequential(nn.Linear(cfg.d_vf, cfg.d_model), nn.ReLU(), nn.Dropout(cfg.drop_prob_lm))
        self.model = make_transformer(vocab_size + 1, cfg.d_model, cfg.d_ff, cfg.num_heads, cfg.num_layers,
                                      cfg.dropout, cfg.rm_num_slots, cfg.rm_num_heads, cfg.rm_d_model)
        self.logit = nn.Linear(cfg.d_model, vocab_size + 1)


class R2GenModel(nn.Module):
    """forward(images, targets) -> log-probabilities (B, T-1, V) for teacher-forced targets.

    Parameter names match the published code (visual_extractor.model.*, encoder_decoder.*), so its
    checkpoints load with load_state_dict.
    """

    bos_idx = eos_idx = pad_idx = 0

    def __init__(self, cfg: ModelConfig, vocab_size: int):
        """vocab_size: the tokenizer's number of tokens (ids 1..vocab_size; 0 is bos/eos/pad)."""
        super().__init__()
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.max_seq_length = cfg.max_seq_length
        self.visual_extractor = VisualExtractor(cfg.backbone)
        self.encoder_decoder = EncoderDecoder(cfg, vocab_size)

    # -- features ---------------------------------------------------------------------------------
    def extract(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B, views, 3, H, W) -> att_feats (B, views*HW, d_vf), fc_feats (B, views*d_vf)."""
        if images.dim() != 5 or images.size(1) != self.cfg.num_views:
            raise ValueError(f"expected images of shape (B, {self.cfg.num_views}, 3, H, W), got {tuple(images.shape)}")
        atts, fcs = zip(*(self.visual_extractor(images[:, v]) for v in range(images.size(1))))
        return torch.cat(atts, dim=1), torch.cat(fcs, dim=1)

    def _embed_att(self, att_feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        att_feats = self.encoder_decoder.att_embed(att_feats)
        att_masks = att_feats.new_ones(att_feats.shape[:2], dtype=torch.long).unsqueeze(-2)
        return att_feats, att_masks

    # -- training -----------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        att_feats, _ = self.extract(images)
        return self.forward_features(att_feats, targets)

    def memory_states(self, targets: torch.Tensor) -> torch.Tensor:
        """The relational memory's states for teacher-forced targets, (B, T-1, slots * d): they read the
        targets alone, so a GPU may compute them beside the visual extractor (r2gen.speedups.overlapped_forward)
        and hand them to forward_features."""
        return self.encoder_decoder.model.memory_states(targets[:, :-1])

    def forward_features(self, att_feats: torch.Tensor, targets: torch.Tensor,
                         memory: torch.Tensor | None = None) -> torch.Tensor:
        """Log-probabilities from patch features; memory: memory_states(targets), if already computed."""
        att_feats, att_masks = self._embed_att(att_feats)
        seq = targets[:, :-1]
        seq_mask = seq > 0
        seq_mask[:, 0] = True
        seq_mask = seq_mask.unsqueeze(-2) & subsequent_mask(seq.size(-1), seq.device)
        out = self.encoder_decoder.model(att_feats, seq, att_masks, seq_mask, memory)
        return F.log_softmax(self.encoder_decoder.logit(out), dim=-1)

    # -- generation primitives (used by r2gen.model.generation) -----------------------------------------
    def prepare_generation(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode the images once: (encoder memory (B, L, d), source mask (B, 1, L))."""
        return self.encode_features(self.extract(images)[0])

    def encode_features(self, att_feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """prepare_generation on patch features already extracted (extract(images)[0])."""
        att_feats, att_masks = self._embed_att(att_feats)
        return self.encoder_decoder.model.encode(att_feats, att_masks), att_masks

    def step_logprobs(self, ys: torch.Tensor, memory: torch.Tensor, src_mask: torch.Tensor) -> torch.Tensor:
        """Log-probabilities of the next token after the prefix ys (B, t) -> (B, V).

        As published, the whole prefix is decoded again at every step (no cache).
        """
        out = self.encoder_decoder.model.decode(memory, src_mask, ys, subsequent_mask(ys.size(1), ys.device))
        return F.log_softmax(self.encoder_decoder.logit(out[:, -1]), dim=-1)


def masked_nll(logprobs: torch.Tensor, targets: torch.Tensor, masks: torch.Tensor,
               tokens: torch.Tensor | float | None = None) -> torch.Tensor:
    """R2Gen's LanguageModelCriterion on teacher-forced outputs: mean NLL over unmasked tokens.

    logprobs (B, T-1, V) predicts targets[:, 1:] where masks[:, 1:] is set. `tokens` replaces the
    denominator: a micro-batch of an accumulation window divides by the window's token count, so
    the window's summed loss is the per-token mean over the whole window, as one big batch.
    """
    target = targets[:, 1:1 + logprobs.size(1)]
    mask = masks[:, 1:1 + logprobs.size(1)].to(logprobs.dtype)
    nll = -logprobs.gather(2, target.long().unsqueeze(2)).squeeze(2) * mask
    return nll.sum() / (mask.sum() if tokens is None else tokens)


def target_tokens(masks: torch.Tensor) -> torch.Tensor:
    """Number of predicted tokens in a batch: the denominator of masked_nll."""
    return masks[:, 1:].sum()
