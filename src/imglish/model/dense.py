"""Dense prediction on the BEiT-3 backbone: feature maps, two necks, a UperNet segmenter and a Mask R-CNN detector.

The backbone sees an image as 1 + N tokens; a dense head wants (B, C, h, w) maps at several strides. Here:

* :func:`vision_feature_maps` runs a vision-only pass at any image size (a multiple of the patch size; the position
  table is resampled to the grid) and returns the patch tokens of chosen layers as (B, D, H/p, W/p) maps;
* :class:`MultiLevelNeck` is BEiT's four-level neck for segmentation: the outputs of four layers (by default
  those at 1/3, 1/2, 2/3 and all of the depth: base 4, 6, 8, 12; large 8, 12, 16, 24) go through deconv x2 twice,
  deconv x2 once, identity and a 2x2 max-pool, giving strides p/4, p/2, p and 2p (4, 8, 16, 32 for patch 16);
* :class:`SimpleFeaturePyramid` is ViTDet's pyramid for detection: the last layer only, scaled by 4, 2, 1 and 1/2,
  each level projected to ``out_channels`` (1x1 and 3x3 convolutions with LayerNorm), plus a max-pooled fifth level
  (strides 4, 8, 16, 32, 64 for patch 16);
* :class:`BEiT3ForSemanticSegmentation`: the four-level neck, a UperNet head (pyramid pooling on the coarsest
  level, a top-down FPN, fusion of all levels) and an FCN auxiliary head on the stride-p level; logits are
  upsampled to the input size;
* :class:`BEiT3ForDetection`: torchvision's Mask R-CNN (RPN, RoIAlign box and mask heads, its resize-and-batch
  transform) on the simple feature pyramid. No mmcv, no detectron2.

Both models keep the backbone under ``beit3`` like every task model, so pretrained and fine-tuned checkpoints load
with the usual machinery (the neck and heads are new parameters). Layer-wise lr decay puts the necks and heads in
the top group (``layer_id`` = L + 1).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from imglish.model.backbone import BEiT3
from imglish.model.config import BEiT3Config
from imglish.model.heads import BEiT3Model

__all__ = [
    "BEiT3ForDetection",
    "BEiT3ForSemanticSegmentation",
    "FCNHead",
    "LayerNorm2d",
    "MultiLevelNeck",
    "SimpleFeaturePyramid",
    "UperNetHead",
    "default_out_layers",
    "vision_feature_maps",
]


def default_out_layers(depth: int) -> tuple[int, int, int, int]:
    """The four layers (1-based) BEiT's neck reads: a third, a half, two thirds and all of the depth."""
    layers = (round(depth / 3), depth // 2, round(2 * depth / 3), depth)
    return tuple(max(1, min(depth, v)) for v in layers)  # type: ignore[return-value]


def vision_feature_maps(beit3: BEiT3, image: Tensor, layers: Sequence[int]) -> list[Tensor]:
    """Patch tokens of ``layers`` (1-based; 0 is the embedding) as (B, D, H/p, W/p) maps, CLS dropped.

    Args:
        beit3: the backbone (built with ``dynamic_img_size=True`` to take any multiple of the patch size).
        image: (B, 3, H, W) normalised pixels.
        layers: which layer outputs to return, in the order wanted.
    """
    depth = beit3.num_layers
    bad = [v for v in layers if not 0 <= int(v) <= depth]
    if bad:
        raise ValueError(f"feature layers must be in 0..{depth} (0 = embeddings), got {list(layers)}")
    p = beit3.config.patch_size
    gh, gw = image.shape[-2] // p, image.shape[-1] // p
    out = beit3(image, output_hidden_states=True)
    maps = []
    for v in layers:
        x = out.hidden_states[int(v)][:, 1:]
        maps.append(x.transpose(1, 2).reshape(x.shape[0], x.shape[2], gh, gw))
    return maps


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of a (B, C, H, W) map."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


def _up(in_ch: int, out_ch: int) -> nn.ConvTranspose2d:
    return nn.ConvTranspose2d(in_ch, out_ch, kernel_size=2, stride=2)


class MultiLevelNeck(nn.Module):
    """BEiT's segmentation neck: four (B, D, h, w) maps to strides p/4, p/2, p and 2p (all D channels)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fpn1 = nn.Sequential(_up(dim, dim), nn.BatchNorm2d(dim), nn.GELU(), _up(dim, dim))
        self.fpn2 = _up(dim, dim)
        self.fpn3 = nn.Identity()
        self.fpn4 = nn.MaxPool2d(kernel_size=2, stride=2)

    def forward(self, maps: Sequence[Tensor]) -> list[Tensor]:
        if len(maps) != 4:
            raise ValueError(f"MultiLevelNeck takes 4 feature maps, got {len(maps)}")
        return [f(x) for f, x in zip((self.fpn1, self.fpn2, self.fpn3, self.fpn4), maps)]


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's pyramid from one (B, D, h, w) map: levels ``"0"``..``"3"`` at strides p/4, p/2, p, 2p and ``"pool"``
    at 4p, each with ``out_channels`` channels (the names torchvision's detection heads expect)."""

    def __init__(self, dim: int, out_channels: int = 256, scales: Sequence[float] = (4.0, 2.0, 1.0, 0.5)) -> None:
        super().__init__()
        self.scales = tuple(float(s) for s in scales)
        self.out_channels = out_channels
        self.stages = nn.ModuleList()
        for s in self.scales:
            if s == 4.0:
                layers: list[nn.Module] = [_up(dim, dim // 2), LayerNorm2d(dim // 2), nn.GELU(),
                                           _up(dim // 2, dim // 4)]
                ch = dim // 4
            elif s == 2.0:
                layers, ch = [_up(dim, dim // 2)], dim // 2
            elif s == 1.0:
                layers, ch = [], dim
            elif s == 0.5:
                layers, ch = [nn.MaxPool2d(kernel_size=2, stride=2)], dim
            else:
                raise ValueError(f"SimpleFeaturePyramid scales must be among 4, 2, 1, 0.5; got {s}")
            layers += [
                nn.Conv2d(ch, out_channels, kernel_size=1, bias=False), LayerNorm2d(out_channels),
                nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
                LayerNorm2d(out_channels),
            ]
            self.stages.append(nn.Sequential(*layers))

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        out: OrderedDict[str, Tensor] = OrderedDict()
        for i, stage in enumerate(self.stages):
            out[str(i)] = stage(x)
        out["pool"] = F.max_pool2d(out[str(len(self.stages) - 1)], kernel_size=1, stride=2)
        return out


def _conv_bn_relu(in_ch: int, out_ch: int, k: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, k, padding=k // 2, bias=False), nn.BatchNorm2d(out_ch),
                         nn.ReLU(inplace=True))


def _resize(x: Tensor, size: Sequence[int]) -> Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class UperNetHead(nn.Module):
    """UperNet: pyramid pooling on the coarsest level, a top-down FPN, all levels fused at the finest one.

    Args:
        in_channels: channels of each input level (finest first).
        channels: width of the head.
        num_classes: output classes.
        pool_scales: bins of the pyramid pooling module.
        dropout: dropout before the classifier.
    """

    def __init__(self, in_channels: Sequence[int], channels: int, num_classes: int,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1) -> None:
        super().__init__()
        *fine, coarse = list(in_channels)
        self.pool_scales = tuple(pool_scales)
        self.ppm = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), _conv_bn_relu(coarse, channels, 1)) for s in self.pool_scales
        )
        self.bottleneck = _conv_bn_relu(coarse + len(self.pool_scales) * channels, channels, 3)
        self.lateral = nn.ModuleList(_conv_bn_relu(c, channels, 1) for c in fine)
        self.fpn = nn.ModuleList(_conv_bn_relu(channels, channels, 3) for _ in fine)
        self.fuse = _conv_bn_relu(len(in_channels) * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, kernel_size=1)

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        *fine, coarse = feats
        size = coarse.shape[-2:]
        pooled = [_resize(m(coarse), size) for m in self.ppm]
        lat = [conv(x) for conv, x in zip(self.lateral, fine)] + [self.bottleneck(torch.cat([coarse, *pooled], 1))]
        for i in range(len(lat) - 1, 0, -1):
            lat[i - 1] = lat[i - 1] + _resize(lat[i], lat[i - 1].shape[-2:])
        outs = [conv(x) for conv, x in zip(self.fpn, lat[:-1])] + [lat[-1]]
        top = outs[0].shape[-2:]
        fused = self.fuse(torch.cat([outs[0]] + [_resize(x, top) for x in outs[1:]], 1))
        return self.classifier(self.dropout(fused))


class FCNHead(nn.Module):
    """The auxiliary head: 3x3 conv, BatchNorm, ReLU, dropout, 1x1 classifier."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.conv = _conv_bn_relu(in_channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.dropout(self.conv(x)))


def _init_dense(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class BEiT3ForSemanticSegmentation(BEiT3Model):
    """Semantic segmentation: BEiT-3 + four-level neck + UperNet (+ FCN auxiliary head in training).

    Args:
        config: the backbone (built with ``dynamic_img_size`` so that any multiple of the patch size works).
        num_classes: classes (ADE20K: 150).
        out_layers: the four layers the neck reads (1-based); default :func:`default_out_layers`.
        channels: UperNet width (BEiT's base recipe: 768; our default: the embedding size).
        aux_channels: FCN auxiliary head width (0 disables the head).
    """

    task = "segmentation"
    head_keys = ("decode_head.classifier.weight", "decode_head.classifier.bias",
                 "aux_head.classifier.weight", "aux_head.classifier.bias")

    def __init__(self, config: BEiT3Config, num_classes: int = 150, out_layers: Sequence[int] | None = None,
                 channels: int | None = None, aux_channels: int = 256) -> None:
        super().__init__(config)
        dim = config.embed_dim
        self.num_classes = int(num_classes)
        self.out_layers = tuple(int(v) for v in (out_layers or default_out_layers(config.depth)))
        if len(self.out_layers) != 4:
            raise ValueError(f"out_layers must name 4 layers, got {list(self.out_layers)}")
        self.channels = int(channels or dim)
        self.aux_channels = int(aux_channels)
        self.neck = MultiLevelNeck(dim)
        self.decode_head = UperNetHead([dim] * 4, self.channels, self.num_classes)
        self.aux_head = FCNHead(dim, self.aux_channels, self.num_classes) if self.aux_channels > 0 else None
        for part in (self.neck, self.decode_head, self.aux_head):
            if part is not None:
                _init_dense(part)

    def task_kwargs(self) -> dict:
        return {"num_classes": self.num_classes, "out_layers": list(self.out_layers), "channels": self.channels,
                "aux_channels": self.aux_channels}

    def forward_features(self, image: Tensor) -> list[Tensor]:
        """The neck's four levels (strides p/4, p/2, p, 2p)."""
        return self.neck(vision_feature_maps(self.beit3, image, self.out_layers))

    def forward(self, image: Tensor, return_aux: bool = False, **kwargs) -> Tensor | tuple[Tensor, Tensor | None]:
        """(B, 3, H, W) -> logits (B, num_classes, H, W); with ``return_aux`` also the auxiliary head's logits
        (None without one)."""
        feats = self.forward_features(image)
        size = image.shape[-2:]
        logits = _resize(self.decode_head(feats), size)
        if not return_aux:
            return logits
        aux = _resize(self.aux_head(feats[2]), size) if self.aux_head is not None else None
        return logits, aux


class BEiT3ForDetection(BEiT3Model):
    """Object detection and instance segmentation: torchvision's Mask R-CNN on BEiT-3's simple feature pyramid.

    Takes images as a list of (3, H, W) tensors in [0, 1] (any sizes); the Mask R-CNN transform normalises them
    with ``image_mean``/``image_std``, resizes them (shorter side ``min_size``, longer at most ``max_size``) and pads
    them into a batch. In training ``forward(images, targets)`` returns torchvision's loss dict; in eval mode a list
    of ``{"boxes", "labels", "scores", "masks"}`` in the input images' coordinates.

    Args:
        config: the backbone (``dynamic_img_size``).
        num_classes: classes including the background (COCO: 80 + 1).
        fpn_channels: channels of every pyramid level and of the RPN/RoI heads (ViTDet: 256).
        box_head_dim: width of the two-layer box head (torchvision: 1024).
        mask_head_dim: width of the four mask-head convolutions (torchvision: 256).
        min_size, max_size: the transform's resize.
        anchor_sizes: one anchor size per pyramid level (5; default 32..512, for ~1024-pixel images).
        image_mean, image_std: normalisation (BEiT-3 pretraining: 0.5).
        with_masks: build the mask branch (False: Faster R-CNN).
        detections_per_img, box_score_thresh: test-time limits.
        rpn_proposals: proposals kept after the RPN's NMS in training (half of it at test time; torchvision:
            2000 / 1000).
        roi_batch: RoIs sampled per image for the box and mask losses (torchvision: 512; the RPN samples at most
            256 anchors, fewer when this is smaller).
    """

    task = "detection"
    head_keys = ("roi_heads.box_predictor.cls_score.weight", "roi_heads.box_predictor.cls_score.bias",
                 "roi_heads.box_predictor.bbox_pred.weight", "roi_heads.box_predictor.bbox_pred.bias",
                 "roi_heads.mask_predictor.mask_fcn_logits.weight", "roi_heads.mask_predictor.mask_fcn_logits.bias")

    def __init__(self, config: BEiT3Config, num_classes: int = 81, fpn_channels: int = 256, box_head_dim: int = 1024,
                 mask_head_dim: int = 256, min_size: int = 1024, max_size: int = 1024,
                 anchor_sizes: Sequence[int] = (32, 64, 128, 256, 512),
                 image_mean: Sequence[float] = (0.5, 0.5, 0.5), image_std: Sequence[float] = (0.5, 0.5, 0.5),
                 with_masks: bool = True, detections_per_img: int = 100, box_score_thresh: float = 0.05,
                 rpn_proposals: int = 2000, roi_batch: int = 512) -> None:
        super().__init__(config)
        from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
        from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
        from torchvision.models.detection.roi_heads import RoIHeads
        from torchvision.models.detection.rpn import AnchorGenerator, RegionProposalNetwork, RPNHead
        from torchvision.models.detection.transform import GeneralizedRCNNTransform
        from torchvision.ops import MultiScaleRoIAlign

        if num_classes < 2:
            raise ValueError(f"num_classes counts the background and must be >= 2, got {num_classes}")
        if len(anchor_sizes) != 5:
            raise ValueError(f"anchor_sizes needs one size per pyramid level (5), got {list(anchor_sizes)}")
        self._kwargs = dict(
            num_classes=int(num_classes), fpn_channels=int(fpn_channels), box_head_dim=int(box_head_dim),
            mask_head_dim=int(mask_head_dim), min_size=int(min_size), max_size=int(max_size),
            anchor_sizes=[int(a) for a in anchor_sizes], image_mean=[float(v) for v in image_mean],
            image_std=[float(v) for v in image_std], with_masks=bool(with_masks),
            detections_per_img=int(detections_per_img), box_score_thresh=float(box_score_thresh),
            rpn_proposals=int(rpn_proposals), roi_batch=int(roi_batch),
        )
        self.num_classes = int(num_classes)
        c = int(fpn_channels)
        self.neck = SimpleFeaturePyramid(config.embed_dim, c)
        self.transform = GeneralizedRCNNTransform(min_size, max_size, list(image_mean), list(image_std),
                                                  size_divisible=max(32, 2 * config.patch_size))
        anchors = AnchorGenerator(tuple((int(a),) for a in anchor_sizes), ((0.5, 1.0, 2.0),) * 5)
        self.rpn = RegionProposalNetwork(
            anchors, RPNHead(c, anchors.num_anchors_per_location()[0]),
            fg_iou_thresh=0.7, bg_iou_thresh=0.3, batch_size_per_image=min(256, roi_batch), positive_fraction=0.5,
            pre_nms_top_n={"training": rpn_proposals, "testing": max(rpn_proposals // 2, 1)},
            post_nms_top_n={"training": rpn_proposals, "testing": max(rpn_proposals // 2, 1)},
            nms_thresh=0.7,
        )
        levels = ["0", "1", "2", "3"]
        mask_kw = {}
        if with_masks:
            mask_kw = dict(
                mask_roi_pool=MultiScaleRoIAlign(levels, 14, 2),
                mask_head=MaskRCNNHeads(c, [mask_head_dim] * 4, 1),
                mask_predictor=MaskRCNNPredictor(mask_head_dim, mask_head_dim, num_classes),
            )
        self.roi_heads = RoIHeads(
            MultiScaleRoIAlign(levels, 7, 2), TwoMLPHead(c * 49, box_head_dim),
            FastRCNNPredictor(box_head_dim, num_classes),
            fg_iou_thresh=0.5, bg_iou_thresh=0.5, batch_size_per_image=roi_batch, positive_fraction=0.25,
            bbox_reg_weights=None, score_thresh=box_score_thresh, nms_thresh=0.5,
            detections_per_img=detections_per_img, **mask_kw,
        )
        _init_dense(self.neck)

    def task_kwargs(self) -> dict:
        return dict(self._kwargs)

    def forward_features(self, images: Tensor) -> OrderedDict[str, Tensor]:
        """The pyramid of a padded, normalised batch (B, 3, H, W)."""
        return self.neck(vision_feature_maps(self.beit3, images, [self.beit3.num_layers])[0])

    def forward(self, images: Sequence[Tensor] | Tensor, targets: Sequence[dict[str, Tensor]] | None = None,
                **kwargs):
        """Training: ``(images, targets)`` -> loss dict; eval: ``images`` -> detections per image."""
        if isinstance(images, Tensor):
            if images.dim() != 4:
                raise ValueError(f"images must be a list of (3, H, W) tensors or a (B, 3, H, W) tensor, got "
                                 f"{tuple(images.shape)}")
            images = list(images.unbind(0))
        if self.training and targets is None:
            raise ValueError("a detection model in training mode needs targets (boxes, labels[, masks])")
        original = [tuple(img.shape[-2:]) for img in images]
        batch, targets = self.transform(list(images), None if targets is None else [dict(t) for t in targets])
        feats = self.forward_features(batch.tensors)
        proposals, rpn_losses = self.rpn(batch, feats, targets)
        detections, roi_losses = self.roi_heads(feats, proposals, batch.image_sizes, targets)
        if self.training:
            return {**rpn_losses, **roi_losses}
        return self.transform.postprocess(detections, batch.image_sizes, original)


def _register() -> None:
    from imglish.model.heads import TASK_MODELS

    for cls in (BEiT3ForSemanticSegmentation, BEiT3ForDetection):
        TASK_MODELS[cls.task] = cls


_register()
