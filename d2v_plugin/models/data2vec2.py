"""data2vec 2.0 (``data2vec_multi``): wires modality encoder, shared blocks, decoder,
EMA teacher, targets and loss together. Each of those lives in its own module."""

import dataclasses
import logging
from dataclasses import dataclass, field
from functools import partial
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.models import BaseFairseqModel, register_model
from fairseq.modules.transformer_sentence_encoder import init_bert_params
from omegaconf import II, OmegaConf

from ..encoder import EncoderOutput
from .architectures import Architecture, register_architecture
from .blocks import Block, scaled_alibi, set_activation_checkpointing, skip_block
from .ema import EMATeacher
from .loss import RepresentationCollapse, regression_loss  # noqa: F401  (RepresentationCollapse: public here)
from .masking import MaskSeed
from .modalities.audio import AudioConfig, AudioEncoder
from .modalities.image import ImageConfig, ImageEncoder
from .modalities.text import TextConfig, TextEncoder
from .targets import targets_from_config
from .teacher import TeacherMixin

logger = logging.getLogger(__name__)

MODALITIES = ChoiceEnum(["TEXT", "AUDIO", "IMAGE"])


@dataclass
class ModalitiesConfig(FairseqDataclass):
    audio: AudioConfig = field(default_factory=AudioConfig, metadata={"help": "speech modality"})
    image: ImageConfig = field(default_factory=ImageConfig, metadata={"help": "image modality"})
    text: TextConfig = field(default_factory=TextConfig, metadata={"help": "text modality"})


@dataclass
class Data2VecMultiConfig(FairseqDataclass):
    loss_beta: float = field(default=0.0, metadata={"help": "beta of the smooth L1 loss; 0 = L2 loss"})
    loss_scale: Optional[float] = field(default=None, metadata={"help": "multiply the loss by this; None = 1/sqrt(embed_dim)"})
    depth: int = field(default=8, metadata={"help": "number of shared transformer blocks"})
    start_drop_path_rate: float = field(default=0.0, metadata={"help": "stochastic depth of the first block"})
    end_drop_path_rate: float = field(default=0.0, metadata={"help": "stochastic depth of the last block (linear in between)"})
    num_heads: int = field(default=12, metadata={"help": "attention heads"})
    norm_eps: float = field(default=1e-6, metadata={"help": "LayerNorm epsilon"})
    norm_affine: bool = field(default=True, metadata={"help": "LayerNorms have learned scale and bias"})
    encoder_dropout: float = field(default=0.1, metadata={"help": "dropout after attention"})
    post_mlp_drop: float = field(default=0.1, metadata={"help": "dropout after the feed-forward network"})
    attention_dropout: float = field(default=0.1, metadata={"help": "dropout on attention weights"})
    activation_dropout: float = field(default=0.0, metadata={"help": "dropout inside the feed-forward network"})
    dropout_input: float = field(default=0.0, metadata={"help": "dropout on the input of the shared blocks"})
    layerdrop: float = field(default=0.0, metadata={"help": "probability of skipping a shared block in training"})
    activation_checkpointing: bool = field(
        default=False,
        metadata={"help": "recompute each transformer block's activations in the backward pass instead of storing them: "
                  "less memory for ~30% more compute, same gradients (torch.utils.checkpoint, non-reentrant)"},
    )
    embed_dim: int = field(default=768, metadata={"help": "model width"})
    mlp_ratio: float = field(default=4.0, metadata={"help": "feed-forward width, times embed_dim"})
    layer_norm_first: bool = field(default=False, metadata={"help": "pre-norm blocks (post-norm if false; Meta's recipes are post-norm)"})
    pre_norm_ffn_residual: bool = field(
        default=False,
        metadata={"help": "layer_norm_first only: the textbook pre-norm block x + mlp(norm2(x)). false = Meta's data2vec_multi "
                  "block, which returns 2 * mlp(norm2(x)) and drops the residual around the feed-forward network "
                  "(what Meta's pre-norm checkpoints were trained with)"},
    )
    average_top_k_layers: int = field(default=8, metadata={"help": "targets average the teacher's last K blocks"})
    end_of_block_targets: bool = field(default=False, metadata={"help": "targets are block outputs (false: feed-forward outputs before the residual)"})
    clone_batch: int = field(default=1, metadata={"help": "student copies of each sample, each with its own mask, sharing one teacher pass"})
    layer_norm_target_layer: bool = field(default=False, metadata={"help": "LayerNorm each target block output"})
    batch_norm_target_layer: bool = field(default=False, metadata={"help": "batch-normalise each target block output"})
    instance_norm_target_layer: bool = field(default=False, metadata={"help": "instance-normalise each target block output over time"})
    instance_norm_targets: bool = field(default=False, metadata={"help": "instance-normalise the averaged targets"})
    target_stats_exclude_padding: bool = field(
        default=False,
        metadata={"help": "instance/batch-normalise the targets with statistics over real (non-padded) steps only. "
                  "false = Meta's: over the whole padded sequence, so targets depend on how much padding a batch holds"},
    )
    layer_norm_targets: bool = field(default=False, metadata={"help": "LayerNorm the averaged targets"})
    ema_decay: float = field(default=0.999, metadata={"help": "teacher EMA decay at update 0"})
    ema_end_decay: float = field(default=0.9999, metadata={"help": "teacher EMA decay at ema_anneal_end_step and after"})
    ema_anneal_end_step: int = field(default=II("optimization.max_update"), metadata={"help": "update at which the decay reaches ema_end_decay (linear schedule)"})
    ema_encoder_only: bool = field(default=True, metadata={"help": "the teacher copies only the shared blocks (and uses the student's modality encoder)"})
    ema_same_dtype: bool = field(
        default=True,
        metadata={"help": "the teacher runs in the student's dtype (fp16/bf16 training; averaging stays in fp32 master "
                  "weights, as Meta's); false = the teacher always runs in fp32"},
    )
    log_norms: bool = field(default=True, metadata={"help": "log model_norm and ema_norm"})
    max_update: int = field(default=II("optimization.max_update"), metadata={"help": "set from optimization.max_update"})
    modalities: ModalitiesConfig = field(default_factory=ModalitiesConfig, metadata={"help": "per-modality settings"})
    min_target_var: float = field(default=0.1, metadata={"help": "stop training if the target std falls below this (collapse)"})
    min_pred_var: float = field(default=0.01, metadata={"help": "stop training if the prediction std falls below this (collapse)"})
    min_local_var: float = field(
        default=0.0,
        metadata={"help": "stop training if local_var, the std of the modality (local) encoder's output, falls below "
                  "this (a collapsed feature encoder, fairseq #5239); 0 = off (Meta's recipes have no such check)"},
    )
    collapse_check_start: int = field(default=5000, metadata={"help": "check min_target_var / min_pred_var / min_local_var from this update on"})
    supported_modality: MODALITIES = field(default="TEXT", metadata={"help": "the modality this model is trained on"})
    seed: int = field(default=II("common.seed"), metadata={"help": "seed of the reproducible masks"})
    skip_ema: bool = field(default=False, metadata={"help": "build no teacher (feature extraction / fine-tuning)"})
    cls_loss: float = field(default=0.0, metadata={"help": "weight of the CLS-token loss (images: 0.01)"})
    d2v_loss: float = field(default=1.0, metadata={"help": "weight of the regression loss"})
    mae_init: bool = field(default=False, metadata={"help": "initialise Linear layers with Xavier-uniform and zero bias (MAE) instead of BERT's normal(0, 0.02)"})
    decoder_group: bool = field(default=False, metadata={"help": "put decoder parameters in the optimizer parameter group 'decoder' (a composite optimizer can give it its own lr)"})


def plain_config(cfg):
    """A structured OmegaConf config as its (resolved) dataclass instance; anything else unchanged."""
    if OmegaConf.is_config(cfg) and dataclasses.is_dataclass(OmegaConf.get_type(cfg)):
        return OmegaConf.to_object(cfg)
    return cfg


def build_modality_encoder(name: str, cfg: Data2VecMultiConfig, make_block, make_norm, task):
    if name == "TEXT":
        dictionary = getattr(task, "source_dictionary", None) if task is not None else None
        return TextEncoder(cfg.modalities.text, cfg.embed_dim, make_block, make_norm, cfg.layer_norm_first, dictionary)
    if name == "AUDIO":
        return AudioEncoder(cfg.modalities.audio, cfg.embed_dim, make_block, make_norm, cfg.layer_norm_first)
    if name == "IMAGE":
        return ImageEncoder(cfg.modalities.image, cfg.embed_dim, make_block, make_norm, cfg.layer_norm_first)
    raise ValueError(f"modality {name} is not available in this version of d2v_plugin")


@register_model("data2vec_multi", dataclass=Data2VecMultiConfig)
class Data2VecMultiModel(TeacherMixin, BaseFairseqModel):
    def __init__(self, cfg: Data2VecMultiConfig, task=None, skip_ema: bool = False):
        super().__init__()
        # plain dataclasses: the training step reads settings often, and every read of an
        # OmegaConf node costs microseconds (measured: ~3.5% of a tiny model's update)
        self.cfg = cfg = plain_config(cfg)
        self.mode = str(cfg.supported_modality).upper()
        make_norm = partial(nn.LayerNorm, eps=cfg.norm_eps, elementwise_affine=cfg.norm_affine)
        make_block = partial(
            Block,
            cfg.embed_dim,
            cfg.num_heads,
            cfg.mlp_ratio,
            drop=cfg.encoder_dropout,
            attn_drop=cfg.attention_dropout,
            mlp_drop=cfg.activation_dropout,
            post_mlp_drop=cfg.post_mlp_drop,
            norm_layer=make_norm,
            layer_norm_first=cfg.layer_norm_first,
            ffn_targets=not cfg.end_of_block_targets,
            ffn_residual=cfg.pre_norm_ffn_residual,
        )
        block = lambda drop_path: make_block(drop_path=drop_path)  # noqa: E731
        self.modality_encoders = nn.ModuleDict(
            {self.mode: build_modality_encoder(self.mode, cfg, block, make_norm, task)}
        )
        self.dropout_input = nn.Dropout(cfg.dropout_input)
        dpr = np.linspace(cfg.start_drop_path_rate, cfg.end_drop_path_rate, cfg.depth)
        self.blocks = nn.ModuleList([block(float(dpr[i])) for i in range(cfg.depth)])
        self.norm = make_norm(cfg.embed_dim) if cfg.layer_norm_first else None
        self.apply(_mae_init if cfg.mae_init else init_bert_params)
        for enc in self.modality_encoders.values():
            enc.reset_parameters()  # modality-specific init after the model-wide init, as Meta's
        for pn, p in self.named_parameters():
            if p.dim() == 1 or pn.endswith(".bias") or "alibi_scale" in pn:
                p.optim_overrides = {"optimizer": {"weight_decay_scale": 0}}
            if cfg.decoder_group and "decoder" in pn:
                p.param_group = "decoder"
        if cfg.average_top_k_layers > cfg.depth:
            logger.warning(
                f"model.average_top_k_layers={cfg.average_top_k_layers} > depth={cfg.depth}: the targets average all "
                f"{cfg.depth} blocks (as Meta's code does)"
            )
        set_activation_checkpointing(self, cfg.activation_checkpointing)
        self._init_teacher(skip_ema)

    @classmethod
    def build_model(cls, cfg: Data2VecMultiConfig, task=None):
        return cls(cfg, task=task, skip_ema=cfg.skip_ema)

    # ---- teacher (life cycle: TeacherMixin) ----------------------------------------
    def _teacher_source(self) -> nn.Module:
        """The part of the student the teacher averages."""
        return self.blocks if self.cfg.ema_encoder_only else self

    def _make_teacher(self, decay: float) -> EMATeacher:
        """A teacher copied from the student's current weights.

        A full-model teacher needs no decoder, and no local encoder unless configured.
        """
        self.ema = None  # the copy of the student must not include an old teacher
        teacher = EMATeacher(self._teacher_source(), decay)
        if not self.cfg.ema_encoder_only:
            for enc in teacher.model.modality_encoders.values():
                enc.decoder = None
                if not enc.modality_cfg.ema_local_encoder:
                    enc.local_encoder = None
                    enc.project_features = None
        return teacher

    def remove_pretraining_modules(self, modality=None):
        self.ema = None
        self.cfg.clone_batch = 1
        for enc in self.modality_encoders.values():
            enc.remove_pretraining_modules()

    # ---- forward -------------------------------------------------------------------
    def run_blocks(self, blocks, x, enc_out, collect: Optional[str] = None, extra_tokens: int = 0, layerdrop: bool = True):
        """Run shared blocks; return the output and, per block, what ``collect`` asks for:
        ``"targets"`` (what the block offers as a regression target) or ``"outputs"`` (the
        block output); extra tokens removed from those.

        ``layerdrop``: skip blocks at random in training (the student's blocks, not the teacher's).
        """
        collected = []
        for i, blk in enumerate(blocks):
            if layerdrop and self.training and self.cfg.layerdrop > 0 and np.random.random() < self.cfg.layerdrop:
                x = skip_block(x, blk)
                continue
            ab = scaled_alibi(enc_out["alibi_bias"], enc_out["alibi_scale"], i)
            x, t = blk(x, enc_out["padding_mask"], ab)
            if collect is not None:
                collected.append((t if collect == "targets" else x)[:, extra_tokens:])
        return x, collected

    def forward(
        self,
        source,
        target=None,
        id=None,
        mode=None,
        padding_mask=None,
        mask=True,
        features_only=False,
        force_remove_masked=False,
        remove_extra_tokens=True,
        precomputed_mask=None,
    ):
        """One training forward (Meta's signature), or encoder features with ``features_only``.

        ``source``: token ids (B, T), waveforms (B, S) or images (B, C, H, W); ``target``: what
        a teacher with its own local encoder sees instead of ``source``; ``id``: sample ids
        that seed the masks; ``precomputed_mask`` (B * clone_batch, T), 1 = masked: use this
        mask instead of drawing one. Returns ``{"losses": {name: (N, C) tensor}, "sample_size",
        "masked_pct", "pred_var", "target_var", "ema_decay", ...}`` plus the regression
        ``predictions`` and ``targets`` (N, C) at the predicted steps. Padded steps are never
        predicted: they are left out of the loss, ``sample_size`` and the variances.
        """
        mode = (str(mode) if mode is not None else self.mode).upper()
        if mode not in self.modality_encoders:
            raise ValueError(f"mode {mode!r}: this model has the modalities {list(self.modality_encoders)}")
        enc = self.modality_encoders[mode]
        seed = MaskSeed(self.cfg.seed, self.num_updates, id) if id is not None else None
        out = enc(
            source,
            padding_mask,
            mask=mask,
            remove_masked=not features_only or force_remove_masked,
            clone_batch=self.cfg.clone_batch if not features_only else 1,
            mask_seed=seed,
            precomputed_mask=precomputed_mask,
        )
        x, layer_results = self.run_blocks(self.blocks, self.dropout_input(out["x"]), out, collect="targets" if features_only else None)
        if self.norm is not None:
            x = self.norm(x)
        n_extra = enc.modality_cfg.num_extra_tokens
        if features_only:
            pm = out["padding_mask"]
            if remove_extra_tokens and n_extra:
                x = x[:, n_extra:]
                pm = pm[:, n_extra:] if pm is not None else None
            return {"x": x, "padding_mask": pm, "layer_results": layer_results, "mask": out["encoder_mask"]}
        if self.ema is None:
            raise RuntimeError("this model has no EMA teacher (skip_ema / fine-tuning); call extract_features")
        mask_info = out["encoder_mask"]
        if mask_info is None:
            raise ValueError(f"mask_prob of modality {mode} is 0 and no precomputed_mask was given: data2vec needs masked steps to predict")
        pred = enc.decoder(enc.decoder_input(x, mask_info))
        targets = self.teacher_targets(source if target is None else target, padding_mask, out, enc, mode, own_input=target is not None)
        local = out["local_features"]
        if out["full_padding_mask"] is not None:  # (B * clone_batch, T): clone 0 of each sample
            local = local[~out["full_padding_mask"][:: self.cfg.clone_batch]]
        return self.compute_loss(mode, x, pred, targets, mask_info, out["full_padding_mask"], n_extra, local)

    @torch.no_grad()
    def teacher_targets(self, source, padding_mask, student_out, enc, mode, own_input: bool = False):
        """Teacher pass (eval mode) on the unmasked input -> (B, T, C) fp32 targets."""
        x_student = student_out["x"]
        if self.ema.device != x_student.device:
            self.ema.to(x_student.device)
        dtype = self.teacher_dtype(x_student.dtype)
        self.ema.set_dtype(dtype)
        teacher = self.ema.model
        teacher.eval()
        if self.cfg.ema_encoder_only:
            t_enc, blocks = enc, teacher
        else:
            t_enc, blocks = teacher.modality_encoders[mode], teacher.blocks
        if own_input and (self.cfg.ema_encoder_only or not t_enc.modality_cfg.ema_local_encoder):
            raise ValueError("target (a separate teacher input) needs ema_encoder_only=false and ema_local_encoder=true")
        if not self.cfg.ema_encoder_only and t_enc.modality_cfg.ema_local_encoder:
            inp = source.to(dtype) if source.is_floating_point() else source
            inp = t_enc(inp, padding_mask, mask=False, remove_masked=False)
        else:
            # the student's unmasked local features; the student's own modality encoder (in
            # train mode, as Meta's) when ema_encoder_only, else the teacher's
            local = student_out["local_features"].detach()
            local = local if self.cfg.ema_encoder_only else local.to(dtype)  # each encoder in its own dtype
            inp = t_enc.contextualized_features(local, padding_mask, mask=False, remove_masked=False)
        n_extra = enc.modality_cfg.num_extra_tokens
        _, layer_targets = self.run_blocks(blocks, inp["x"].to(dtype), inp, collect="targets", extra_tokens=n_extra, layerdrop=False)
        return targets_from_config(layer_targets, self.cfg, inp["full_padding_mask"])

    def compute_loss(self, mode, x, pred, targets, mask_info, padding_mask, n_extra, local_features=None):
        """Losses at the masked, non-padded steps of every clone row.

        ``targets`` (B, T, C) belong to the un-cloned batch: clone row r regresses sample
        r // clone_batch (``repeat_interleave``). ``padding_mask`` (B * clone_batch, T) or None.
        """
        cfg = self.cfg
        clone = cfg.clone_batch
        full_targets = targets.repeat_interleave(clone, 0) if clone > 1 else targets
        predicted = mask_info.mask.bool()
        if padding_mask is not None:
            predicted = predicted & ~padding_mask
        y = full_targets[predicted]
        p = pred[predicted]
        sample_size = predicted.sum()
        losses = {}
        if cfg.d2v_loss > 0:
            # Meta's loss names: TEXT_regression, AUDIO_regression, IMAGE_regression
            losses[f"{mode}_regression"] = regression_loss(p, y, cfg.loss_beta, cfg.loss_scale) * cfg.d2v_loss
        if cfg.cls_loss > 0:
            if n_extra == 0:
                raise ValueError("cls_loss needs a CLS token (num_extra_tokens >= 1)")
            cls_target = targets.mean(dim=1)
            if clone > 1:
                cls_target = cls_target.repeat_interleave(clone, 0)
            cls_pred = x[:, n_extra - 1]
            losses["cls"] = regression_loss(cls_pred, cls_target, cfg.loss_beta, cfg.loss_scale) * (cfg.cls_loss * sample_size)
        result = {"losses": losses, "sample_size": sample_size, "predictions": p, "targets": y}
        result["masked_pct"] = 1 - mask_info.ids_keep.size(1) / mask_info.ids_restore.size(1)
        self.add_step_statistics(result, local_features)
        return result

    def encode(self, source, padding_mask=None, output_hidden_states: bool = False, keep_extra_tokens: bool = False) -> EncoderOutput:
        """The student's output on the unmasked input (see :class:`d2v_plugin.EncoderOutput`)."""
        enc = self.modality_encoders[self.mode]
        out = enc(source, padding_mask, mask=False, remove_masked=False)
        x, hidden = self.run_blocks(self.blocks, self.dropout_input(out["x"]), out, collect="outputs" if output_hidden_states else None)
        if self.norm is not None:
            x = self.norm(x)
        return EncoderOutput.from_sequence(x, out["padding_mask"], hidden, enc.modality_cfg.num_extra_tokens, keep_extra_tokens, output_hidden_states)

    @property
    def embed_dim(self) -> int:
        return self.cfg.embed_dim

    def max_positions(self):
        """Longest token sequence (text); None for speech and images."""
        return self.cfg.modalities.text.max_source_positions if self.mode == "TEXT" else None

    def extract_features(self, source, padding_mask=None, mask=False, mode=None, remove_extra_tokens=True):
        """Encoder output without decoder or teacher (Meta's format): ``{"x": (B, T, C),
        "padding_mask", "layer_results", "mask"}``; ``layer_results`` are the per-block target
        tensors (feed-forward outputs unless ``end_of_block_targets``), extra tokens included.
        For a typed output use :class:`d2v_plugin.Encoder` (``d2v_plugin.load_encoder``)."""
        return self.forward(source, padding_mask=padding_mask, mask=mask, features_only=True, mode=mode,
                            remove_extra_tokens=remove_extra_tokens)


def _mae_init(module: nn.Module) -> None:
    """MAE-style init (``mae_init``): Xavier-uniform Linear weights, zero biases, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        if module.weight is not None:
            nn.init.ones_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


register_architecture(
    Architecture(
        name="data2vec_multi",
        config=Data2VecMultiConfig,
        model=Data2VecMultiModel,
        modality=None,
        vocab_key="modality_encoders.TEXT.local_encoder.embed_tokens.weight",
    )
)
