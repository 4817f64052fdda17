"""Task models: the backbone (attribute `beit3`, as officially) plus a thin head (spec §2.2).

Every task model accepts the official forward arguments by their official names and returns what the official
model returns, so code written against `beit3/modeling_finetune.py` keeps working. On top of that every model has
the feature API (`encode_image`, `encode_text`, `extract_features`) and the training hooks (`no_weight_decay`,
`layer_id`, `set_grad_checkpointing`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from imglish.model.backbone import TEXT, VISION, BEiT3, BEiT3Output, MultiwayBlock, expert_keys
from imglish.model.config import BEiT3Config
from imglish.model.layers import KVCache, build_attention_mask, trunc_normal_

__all__ = [
    "BEiT3Model",
    "BEiT3ForCaptioning",
    "BEiT3ForImageClassification",
    "BEiT3ForPretraining",
    "BEiT3ForRetrieval",
    "BEiT3ForVisualQuestionAnswering",
    "BEiT3ForVisualReasoning",
    "PretrainingOutput",
    "TASK_MODELS",
    "captioning_attention_mask",
    "clip_loss",
]


@torch.no_grad()
def _init_head(module: nn.Module, scale: float = 1.0) -> None:
    """Official head init: trunc-normal(0.02) Linear weights, zero biases, unit LayerNorms; Linear scaled by `scale`."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight)
            if m.bias is not None:
                m.bias.zero_()
            if scale != 1.0:
                m.weight.mul_(scale)
                if m.bias is not None:
                    m.bias.mul_(scale)
        elif isinstance(m, nn.LayerNorm):
            m.weight.fill_(1.0)
            m.bias.zero_()


class BEiT3Model(nn.Module):
    """The bare backbone as a model (no head), with the feature API every task model shares."""

    task = "backbone"
    #: head parameter names that may be dropped when a checkpoint's shape differs (e.g. another class count)
    head_keys: tuple[str, ...] = ()

    def __init__(self, config: BEiT3Config) -> None:
        super().__init__()
        self.beit3 = BEiT3(config)

    @property
    def config(self) -> BEiT3Config:
        return self.beit3.config

    @property
    def num_layers(self) -> int:
        return self.beit3.num_layers

    def task_kwargs(self) -> dict:
        """Constructor arguments besides the config (saved with our checkpoints)."""
        return {}

    def forward(self, image: Tensor | None = None, text_ids: Tensor | None = None, padding_mask: Tensor | None = None,
                **kwargs) -> BEiT3Output:
        return self.beit3(image, text_ids, padding_mask, **kwargs)

    # ------------------------------------------------------------------ features
    def extract_features(
        self,
        images: Tensor | None = None,
        texts: Tensor | None = None,
        padding_mask: Tensor | None = None,
        mode: Literal["image", "text", "fused"] | None = None,
        output_hidden_states: bool = False,
    ) -> BEiT3Output:
        """Backbone features of images, texts or image-text pairs.

        Args:
            images: (B, 3, H, W) normalised pixels.
            texts: (B, T) token ids (use the model's `Processor` to make them from strings).
            padding_mask: (B, T), 1 at padded positions.
            mode: "image" (vision only), "text" (text only) or "fused" (one pass over both). Inferred from the
                inputs when None.
            output_hidden_states: also return the embeddings and every layer's output.

        Returns:
            `BEiT3Output`; `.vision_tokens` / `.text_tokens` slice `.last_hidden_state`.
        """
        if mode is None:
            mode = "fused" if images is not None and texts is not None else ("image" if images is not None else "text")
        if mode == "image":
            if images is None:
                raise ValueError("mode='image' needs images")
            return self.beit3(images, output_hidden_states=output_hidden_states)
        if mode == "text":
            if texts is None:
                raise ValueError("mode='text' needs texts")
            return self.beit3(None, texts, padding_mask, output_hidden_states=output_hidden_states)
        if mode == "fused":
            if images is None or texts is None:
                raise ValueError("mode='fused' needs both images and texts")
            return self.beit3(images, texts, padding_mask, output_hidden_states=output_hidden_states)
        raise ValueError(f"mode must be 'image', 'text' or 'fused', got {mode!r}")

    def encode_image(self, image: Tensor, normalize: bool = False) -> Tensor:
        """One vector per image, (B, D): the vision CLS token of a vision-only pass."""
        feats = self.beit3(image, cls_only=True).last_hidden_state[:, 0]
        return F.normalize(feats, dim=-1) if normalize else feats

    def encode_text(self, text_ids: Tensor, padding_mask: Tensor | None = None, normalize: bool = False) -> Tensor:
        """One vector per text, (B, D): the BOS token of a text-only pass."""
        feats = self.beit3(None, text_ids, padding_mask, cls_only=True).last_hidden_state[:, 0]
        return F.normalize(feats, dim=-1) if normalize else feats

    # ------------------------------------------------------------------ training hooks
    def no_weight_decay(self) -> set[str]:
        """Names excluded from weight decay besides 1-D tensors and biases (spec §7)."""
        return {f"beit3.{name}" for name in self.beit3.no_weight_decay()} | {
            n for n, _ in self.named_parameters() if n == "logit_scale"
        }

    def layer_id(self, name: str) -> int:
        """Layer index for layer-wise lr decay: 0 for embeddings, i + 1 for layer i, L + 1 for the rest."""
        if name.startswith("beit3."):
            rest = name[len("beit3."):]
            if rest.startswith("layers."):
                return int(rest.split(".")[1]) + 1
            if "embed" in rest:
                return 0
        return self.num_layers + 1

    def set_grad_checkpointing(self, enable: bool | str = True) -> None:
        """See `BEiT3.set_grad_checkpointing`: True/"full", "selective" or False/"none"."""
        self.beit3.set_grad_checkpointing(enable)


class BEiT3ForImageClassification(BEiT3Model):
    """ImageNet-style classification: mean of the patch tokens (CLS excluded) -> LayerNorm -> Linear."""

    task = "imageclassification"
    head_keys = ("head.weight", "head.bias")

    def __init__(self, config: BEiT3Config, num_classes: int = 1000) -> None:
        super().__init__(config)
        dim = config.embed_dim
        self.num_classes = num_classes
        self.fc_norm = nn.LayerNorm(dim, eps=config.layernorm_eps)
        self.head = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()
        _init_head(self.fc_norm)
        _init_head(self.head, scale=0.001)

    def task_kwargs(self) -> dict:
        return {"num_classes": self.num_classes}

    def forward_features(self, image: Tensor) -> Tensor:
        """Pooled, normalised features before the classifier, (B, D)."""
        return self.fc_norm(self.beit3(image).last_hidden_state[:, 1:].mean(1))

    def forward(self, image: Tensor, **kwargs) -> Tensor:
        """(B, 3, H, W) -> logits (B, num_classes)."""
        return self.head(self.forward_features(image))


class _TwoLayerMLP(nn.Module):
    def __init__(self, in_features: int, hidden: int, out_features: int, eps: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(in_features, eps=eps)
        self.dense1 = nn.Linear(in_features, hidden)
        self.norm2 = nn.LayerNorm(hidden, eps=eps)
        self.act = nn.GELU()
        self.dense2 = nn.Linear(hidden, out_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.dense2(self.act(self.norm2(self.dense1(self.norm1(x)))))


class BEiT3ForVisualReasoning(BEiT3Model):
    """NLVR2: both images with the statement in one fused pass; [vis_a, txt_a, vis_b, txt_b] -> 2-layer MLP."""

    task = "nlvr2"
    head_keys = ("head.dense2.weight", "head.dense2.bias")

    def __init__(self, config: BEiT3Config, num_classes: int = 2) -> None:
        super().__init__(config)
        dim = config.embed_dim
        self.num_classes = num_classes
        self.head = _TwoLayerMLP(dim * 4, dim * 2, num_classes, config.layernorm_eps)
        _init_head(self.head)
        with torch.no_grad():
            for layer in (self.head.dense1, self.head.dense2):
                layer.weight.mul_(0.001)
                layer.bias.mul_(0.001)

    def task_kwargs(self) -> dict:
        return {"num_classes": self.num_classes}

    def forward(self, image_a: Tensor, image_b: Tensor, text_description: Tensor, padding_mask: Tensor | None = None,
                **kwargs) -> Tensor:
        """Two image batches (B, 3, H, W) and the statement (B, T) -> logits (B, num_classes)."""
        if image_a.shape[0] != image_b.shape[0] or image_a.shape[0] != text_description.shape[0]:
            raise ValueError(
                f"batch sizes differ: image_a {image_a.shape[0]}, image_b {image_b.shape[0]}, "
                f"text_description {text_description.shape[0]}"
            )
        batch = text_description.shape[0]
        images = torch.cat([image_a, image_b], dim=0)
        texts = torch.cat([text_description, text_description], dim=0)
        pad = torch.cat([padding_mask, padding_mask], dim=0) if padding_mask is not None else None
        out = self.beit3(images, texts, pad, cls_only=True)
        x = out.last_hidden_state
        pair = torch.cat([x[:, 0], x[:, out.num_vision_tokens]], dim=-1)  # (2B, 2D): vision CLS, text BOS
        return self.head(torch.cat([pair[:batch], pair[batch:]], dim=-1))


class _Pooler(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.dense = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.dense(self.norm(x[:, 0])))


class BEiT3ForVisualQuestionAnswering(BEiT3Model):
    """VQAv2: fused pass, pooler on token 0 (the vision CLS), MLP over the answer vocabulary."""

    task = "vqav2"
    head_keys = ("head.3.weight", "head.3.bias")

    def __init__(self, config: BEiT3Config, num_classes: int = 3129) -> None:
        super().__init__(config)
        dim = config.embed_dim
        self.num_classes = num_classes
        self.pooler = _Pooler(dim, config.layernorm_eps)
        self.head = nn.Sequential(
            nn.Linear(dim, dim * 2), nn.LayerNorm(dim * 2, eps=config.layernorm_eps), nn.GELU(),
            nn.Linear(dim * 2, num_classes),
        )
        _init_head(self.pooler)
        _init_head(self.head)

    def task_kwargs(self) -> dict:
        return {"num_classes": self.num_classes}

    def forward(self, image: Tensor, question: Tensor, padding_mask: Tensor | None = None, **kwargs) -> Tensor:
        """Images (B, 3, H, W) and questions (B, T) -> answer logits (B, num_classes)."""
        out = self.beit3(image, question, padding_mask, cls_only=True)
        return self.head(self.pooler(out.last_hidden_state))

    @staticmethod
    def loss(logits: Tensor, targets: Tensor) -> Tensor:
        """The official loss: BCE-with-logits against soft scores, summed over answers, averaged over questions."""
        return F.binary_cross_entropy_with_logits(logits.float(), targets.float()) * targets.shape[1]


class _AllGather(torch.autograd.Function):
    """All-gather whose backward all-reduces the gradients and returns this rank's slice."""

    @staticmethod
    def forward(ctx, x: Tensor) -> tuple[Tensor, ...]:
        out = [torch.zeros_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x)
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads: Tensor) -> Tensor:
        all_grads = torch.stack(grads)
        dist.all_reduce(all_grads)
        return all_grads[dist.get_rank()]


def clip_loss(image_feats: Tensor, text_feats: Tensor, logit_scale: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Symmetric contrastive loss over every rank's features (autograd all-gather when distributed).

    Returns `(loss, logits_per_image, logits_per_text)` for this rank's rows.
    """
    if image_feats.shape != text_feats.shape:
        raise ValueError(
            f"image and text features must have the same shape, got {tuple(image_feats.shape)} and "
            f"{tuple(text_feats.shape)}"
        )
    rank, offset = 0, 0
    all_image, all_text = image_feats, text_feats
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        rank = dist.get_rank()
        all_image = torch.cat(_AllGather.apply(image_feats), dim=0)
        all_text = torch.cat(_AllGather.apply(text_feats), dim=0)
        offset = rank * image_feats.shape[0]
    logits_per_image = logit_scale * image_feats @ all_text.t()
    logits_per_text = logit_scale * text_feats @ all_image.t()
    labels = torch.arange(image_feats.shape[0], device=image_feats.device) + offset
    loss = (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
    return loss, logits_per_image, logits_per_text


class BEiT3ForRetrieval(BEiT3Model):
    """Dual encoder: vision CLS and text BOS of separate passes, linear heads (no bias), L2-normalised."""

    task = "retrieval"
    #: open_clip's ceiling for the contrastive temperature; the official code never clamps (spec §11.9)
    max_logit_scale = math.log(100.0)

    def __init__(self, config: BEiT3Config) -> None:
        super().__init__(config)
        dim = config.embed_dim
        self.language_head = nn.Linear(dim, dim, bias=False)
        self.vision_head = nn.Linear(dim, dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        _init_head(self.language_head)
        _init_head(self.vision_head)

    def encode_image(self, image: Tensor, normalize: bool = True) -> Tensor:
        feats = self.vision_head(self.beit3(image, cls_only=True).last_hidden_state[:, 0])
        return F.normalize(feats, dim=-1) if normalize else feats

    def encode_text(self, text_ids: Tensor, padding_mask: Tensor | None = None, normalize: bool = True) -> Tensor:
        feats = self.language_head(self.beit3(None, text_ids, padding_mask, cls_only=True).last_hidden_state[:, 0])
        return F.normalize(feats, dim=-1) if normalize else feats

    def forward(self, image: Tensor | None = None, text_description: Tensor | None = None,
                padding_mask: Tensor | None = None, only_infer: bool = False, **kwargs):
        """Official contract: `(vision_cls, language_cls)` with `only_infer=True`, else `(loss, vision_cls, language_cls)`."""
        vision_cls = self.encode_image(image) if image is not None else None
        language_cls = self.encode_text(text_description, padding_mask) if text_description is not None else None
        if only_infer:
            return vision_cls, language_cls
        if vision_cls is None or language_cls is None:
            raise ValueError("training the retrieval model needs both image and text_description")
        scale = self.logit_scale.clamp(max=self.max_logit_scale).exp()
        loss, _, _ = clip_loss(vision_cls, language_cls, scale)
        return loss, vision_cls, language_cls


def captioning_attention_mask(num_image: int, text_len: int, device: torch.device | None = None) -> Tensor:
    """The official captioning mask, (I + T, I + T) int64 with 1 = blocked (spec §2.2).

    Image rows see every image column and no text; text rows see every image column and the text up to and
    including their own position.
    """
    size = num_image + text_len
    allowed = torch.zeros(size, size, dtype=torch.long, device=device)
    allowed[:num_image, :num_image] = 1
    allowed[num_image:, :num_image] = 1
    allowed[num_image:, num_image:] = torch.tril(torch.ones(text_len, text_len, dtype=torch.long, device=device))
    return 1 - allowed


class BEiT3ForCaptioning(BEiT3Model):
    """Captioning by masked-language modelling under a causal text mask, with incremental decoding."""

    task = "captioning"

    def __init__(self, config: BEiT3Config) -> None:
        super().__init__(config)
        self.mlm_head = nn.Linear(config.embed_dim, config.vocab_size)
        _init_head(self.mlm_head)

    def new_cache(self) -> KVCache:
        return KVCache.empty(self.num_layers)

    def forward(self, image: Tensor | None, text_ids: Tensor, padding_mask: Tensor | None = None,
                language_masked_pos: Tensor | None = None, text_len: int | None = None,
                incremental_state: KVCache | None = None, **kwargs) -> tuple[Tensor, KVCache | None]:
        """Official contract: returns `(logits, incremental_state)`.

        Without a cache: one pass over `[image; text]` with the captioning mask; logits for every text position
        (B, T, V), or for the `language_masked_pos` positions only (flattened, row-major).

        With a cache (`incremental_state`, a `KVCache`): the first call passes the image and the first text
        tokens; later calls pass `image=None` and the new text tokens, which attend to everything cached and
        causally to each other. Unlike the official code, padded prompts keep their padding mask.
        """
        cache = incremental_state
        if isinstance(cache, dict):
            if cache:
                raise TypeError("incremental_state must be an imglish KVCache; pass {} or None to start")
            cache = self.new_cache()
        if image is None and (cache is None or cache.is_empty()):
            raise ValueError("captioning needs the image on the first call (later incremental calls may omit it)")
        n_new = text_ids.shape[1]
        if image is not None:
            grid = (image.shape[-2] // self.config.patch_size, image.shape[-1] // self.config.patch_size)
            num_image = 1 + grid[0] * grid[1]
            n_past = 0
        else:
            num_image, n_past = cache.num_vision_tokens, cache.num_text_tokens
        mask = captioning_attention_mask(num_image, n_past + n_new, text_ids.device)[-(n_new + (num_image if image is not None else 0)):]
        out = self.beit3(image, text_ids, padding_mask, attn_mask=mask, cache=cache)
        text_feats = out.text_tokens
        if language_masked_pos is not None:
            text_feats = text_feats[language_masked_pos.bool()]
        return self.mlm_head(text_feats), cache


@dataclass
class PretrainingOutput:
    """Masked data modelling outputs: logits at the masked positions only (row-major order), and the features.

    ``cls_mim_logits`` / ``cls_mlm_logits`` are the [CLS] head's predictions of the same targets (None without
    one: ``cls_head_layers=0``).
    """

    mim_logits: Tensor | None
    mlm_logits: Tensor | None
    features: BEiT3Output
    cls_mim_logits: Tensor | None = None
    cls_mlm_logits: Tensor | None = None


#: ``BEiT3ForPretraining(cls_head_pairs=...)``: where a pair's first tokens come from for the [CLS] head.
CLS_HEAD_PAIRS = ("fused", "unimodal")


class BEiT3ForPretraining(BEiT3Model):
    """Masked data modelling: MIM head over the visual codebook, MLM head over the text vocabulary (spec §9).

    Key names follow the released pretrained files: `mim_head.*` and, for the MLM projection (no bias),
    `beit3.encoder.output_projection.weight` in the official layout.

    Optionally (``cls_head_layers > 0``; not part of BEiT-3, which leaves the pooled tokens untrained) a [CLS] head
    in the manner of BEiT v2's patch aggregation: a shallow decoder of ``cls_head_layers`` multiway layers reads the
    first token of each modality from the **last** layer (the vision CLS, the text BOS: what the pooled heads of
    VQA, NLVR2 and retrieval read) next to every other token from layer ``cls_head_from``, and predicts the same
    masked targets through the same MIM and MLM heads. The first tokens are then trained to summarise what the
    middle layer lacks. The head is dropped when a task model loads the weights (``cls_head.*``).

    Args:
        config: the backbone.
        num_visual_tokens: size of the visual codebook.
        cls_head_layers: layers of the [CLS] head (0: none, BEiT-3 as published).
        cls_head_from: the layer (0 for the embeddings, up to depth - 1) whose tokens the [CLS] head reads besides
            the first tokens (-1: half the depth). The lower it is, the more the first tokens must carry.
        cls_head_pairs: where the [CLS] head takes an image-text pair's first tokens from: ``"fused"``, the pair's
            own forward (each first token has seen both modalities), or ``"unimodal"``, an image-only and a
            text-only forward of the same pair (what retrieval's two towers compute): the vision CLS alone must
            then carry what the masked caption words need from the image. Two extra forwards per pair batch.
    """

    task = "pretraining"

    def __init__(self, config: BEiT3Config, num_visual_tokens: int = 8192, cls_head_layers: int = 0,
                 cls_head_from: int = -1, cls_head_pairs: str = "fused") -> None:
        super().__init__(config)
        self.num_visual_tokens = num_visual_tokens
        self.mim_head = nn.Linear(config.embed_dim, num_visual_tokens)
        self.mlm_head = nn.Linear(config.embed_dim, config.vocab_size, bias=False)
        _init_head(self.mim_head)
        _init_head(self.mlm_head)
        if cls_head_layers < 0:
            raise ValueError(f"cls_head_layers must be >= 0, got {cls_head_layers}")
        depth = self.num_layers
        self.cls_head_layers = int(cls_head_layers)
        self.cls_head_from = int(cls_head_from) if cls_head_from != -1 else depth // 2
        if cls_head_pairs not in CLS_HEAD_PAIRS:
            raise ValueError(f"cls_head_pairs must be one of {', '.join(CLS_HEAD_PAIRS)}, got {cls_head_pairs!r}")
        self.cls_head_pairs = cls_head_pairs
        self.cls_head: nn.ModuleList | None = None
        self.cls_head_norm: nn.ModuleDict | None = None
        if self.cls_head_layers:
            if not 0 <= self.cls_head_from < depth:
                raise ValueError(
                    f"cls_head_from must name a layer below the last one (0, the embeddings, to {depth - 1} for a "
                    f"{depth}-layer backbone; -1 for half the depth), got {cls_head_from}"
                )
            self.cls_head = nn.ModuleList(MultiwayBlock(config, 0.0, False) for _ in range(self.cls_head_layers))
            self.cls_head_norm = nn.ModuleDict(
                {k: nn.LayerNorm(config.embed_dim, eps=config.layernorm_eps) for k in expert_keys(config)}
            )
            _init_head(self.cls_head)
            _init_head(self.cls_head_norm)

    def task_kwargs(self) -> dict:
        kw = {"num_visual_tokens": self.num_visual_tokens}
        if self.cls_head_layers:
            kw.update(cls_head_layers=self.cls_head_layers, cls_head_from=self.cls_head_from)
            if self.cls_head_pairs != "fused":
                kw["cls_head_pairs"] = self.cls_head_pairs
        return kw

    def forward(self, image: Tensor | None = None, text_ids: Tensor | None = None, padding_mask: Tensor | None = None,
                image_mask: Tensor | None = None, text_mask: Tensor | None = None, **kwargs) -> PretrainingOutput:
        """One stream or a pair.

        Args:
            image: (B, 3, H, W) or None.
            text_ids: (B, T) ids in which the positions to predict are already replaced (e.g. by [MASK]).
            padding_mask: (B, T), 1 at padding.
            image_mask: (B, N) bool, patches replaced by the mask token and predicted by the MIM head.
            text_mask: (B, T) bool, text positions predicted by the MLM head.
        """
        if text_mask is not None and text_ids is None:
            raise ValueError("text_mask was given without text_ids")
        with_cls = self.cls_head is not None and (image_mask is not None or text_mask is not None)
        out = self.beit3(image, text_ids, padding_mask, image_mask=image_mask, output_hidden_states=with_cls)
        mim = mlm = None
        if image_mask is not None:
            mim = self.mim_head(out.vision_tokens[:, 1:][image_mask.bool()])
        if text_mask is not None:
            mlm = self.mlm_head(out.text_tokens[text_mask.bool()])
        res = PretrainingOutput(mim_logits=mim, mlm_logits=mlm, features=out)
        if with_cls:
            firsts = None
            if self.cls_head_pairs == "unimodal" and image is not None and text_ids is not None:
                # retrieval's towers: the image alone and the (masked) text alone give the first tokens
                v_cls = self.beit3(image).last_hidden_state[:, :1]
                t_bos = self.beit3(None, text_ids, padding_mask).last_hidden_state[:, :1]
                firsts = (v_cls, t_bos)
            xv, xt = self._cls_decode(out, firsts)
            if image_mask is not None:
                res.cls_mim_logits = self.mim_head(xv[:, 1:][image_mask.bool()])
            if text_mask is not None:
                res.cls_mlm_logits = self.mlm_head(xt[text_mask.bool()])
        return res

    def _cls_decode(
        self, out: BEiT3Output, firsts: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor | None, Tensor | None]:
        """The [CLS] head: the last layer's first tokens (or ``firsts``, the vision CLS and text BOS of separate
        forwards) with layer ``cls_head_from``'s other tokens, decoded."""
        last, mid = out.hidden_states[-1], out.hidden_states[self.cls_head_from]
        nv = out.num_vision_tokens
        v0, t0 = firsts if firsts is not None else (last[:, :1], last[:, nv:nv + 1])
        xv = torch.cat([v0, mid[:, 1:nv]], dim=1) if nv else None
        xt = torch.cat([t0, mid[:, nv + 1:]], dim=1) if mid.shape[1] > nv else None
        mask = build_attention_mask(out.padding_mask, None, mid.shape[1], mid.dtype)
        fusion = xv is not None and xt is not None
        for block in self.cls_head:
            xv, xt = block(xv, xt, mask, None, fusion)
        xv = self.cls_head_norm[VISION](xv) if xv is not None else None
        xt = self.cls_head_norm[TEXT](xt) if xt is not None else None
        return xv, xt


TASK_MODELS: dict[str, type[BEiT3Model]] = {
    cls.task: cls
    for cls in (
        BEiT3Model,
        BEiT3ForImageClassification,
        BEiT3ForVisualReasoning,
        BEiT3ForVisualQuestionAnswering,
        BEiT3ForRetrieval,
        BEiT3ForCaptioning,
        BEiT3ForPretraining,
    )
}
