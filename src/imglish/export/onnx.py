"""ONNX export of imglish models (``imglish export``), checked with onnxruntime.

    from imglish.export import export_onnx
    result = export_onnx("runs/ret/model.safetensors", "image_encoder", "image_encoder.onnx", verify=True)
    result.max_abs_diff          # {"image_embeds": 3e-07}, onnxruntime against PyTorch at several batch sizes

Parts (what a deployment needs, each one self-contained ONNX graph):

=================  ===========================  ======================================  ===========================
part               checkpoint task              inputs                                  outputs
=================  ===========================  ======================================  ===========================
``image_encoder``  retrieval                    ``image`` (B, 3, S, S)                  ``image_embeds`` (B, D)
``text_encoder``   retrieval                    ``text_ids``, ``padding_mask`` (B, T)   ``text_embeds`` (B, D)
``model``          imageclassification          ``image``                               ``logits`` (B, C)
``model``          vqav2                        ``image``, ``question``, ``padding_mask``  ``logits`` (B, A)
``model``          nlvr2                        ``image_a``, ``image_b``, ``text``,     ``logits`` (B, 2)
                                                ``padding_mask``
``encoder``        captioning                   ``image``, ``text_ids`` (B, T)          ``logits`` (B, T, V),
                                                                                        ``present_keys``,
                                                                                        ``present_values``
``decoder_step``   captioning                   ``text_ids`` (B, T), ``past_keys``,     the same
                                                ``past_values`` (L, B, H, P, d)
=================  ===========================  ======================================  ===========================

Embeddings are L2-normalised (as :func:`imglish.pipeline` gives them); ``padding_mask`` is int64, 1 at padding
(the official convention); images are normalised pixels at the model's resolution (the processor's transform).
The batch is dynamic everywhere, and so are the text length and the cached length of the decoder step.

Captioning is split as the incremental decoding of :mod:`imglish.generation` runs it: ``encoder`` takes the image
and the first text tokens (BOS and [MASK]) and returns the logits and every layer's keys and values, stacked as
(layers, B, heads, positions, head_dim); ``decoder_step`` takes new text tokens and that cache and returns the
logits and the extended cache. The caller keeps the search (beam or greedy) and drops the trailing [MASK]'s
position from the cache between steps (``present_keys[:, :, :, :-1]``), exactly as the PyTorch decoder does.

Export uses the dynamo-based ``torch.onnx.export`` at opset 18; models over 2 GB of weights are written with
external data (``FILE.onnx.data`` beside the file).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "PARTS",
    "ExportResult",
    "example_inputs",
    "export_module",
    "export_onnx",
    "onnx_greedy_search",
    "verify_onnx",
]

#: part -> the model tasks it applies to
PARTS: dict[str, tuple[str, ...]] = {
    "image_encoder": ("retrieval",),
    "text_encoder": ("retrieval",),
    "model": ("imageclassification", "vqav2", "nlvr2"),
    "encoder": ("captioning",),
    "decoder_step": ("captioning",),
}
#: ONNX opset of the export
OPSET = 18
#: files whose weights exceed this are saved with external data (the protobuf limit is 2 GiB)
EXTERNAL_DATA_BYTES = 2 * 1024**3 - 64 * 1024**2


# ============================================================================================= the graphs
class ImageEncoder(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: Tensor) -> Tensor:
        return F.normalize(self.model.encode_image(image, normalize=False).float(), dim=-1)


class TextEncoder(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, text_ids: Tensor, padding_mask: Tensor) -> Tensor:
        return F.normalize(self.model.encode_text(text_ids, padding_mask, normalize=False).float(), dim=-1)


class Classifier(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: Tensor) -> Tensor:
        return self.model(image=image)


class VQA(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: Tensor, question: Tensor, padding_mask: Tensor) -> Tensor:
        return self.model(image=image, question=question, padding_mask=padding_mask)


class NLVR2(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image_a: Tensor, image_b: Tensor, text: Tensor, padding_mask: Tensor) -> Tensor:
        return self.model(image_a=image_a, image_b=image_b, text_description=text, padding_mask=padding_mask)


def _stack(cache: Any) -> tuple[Tensor, Tensor]:
    return (torch.stack([layer.key for layer in cache.layers]), torch.stack([layer.value for layer in cache.layers]))


class CaptionEncoder(nn.Module):
    """The first incremental call: image and first text tokens -> logits and the stacked cache."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: Tensor, text_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        cache = self.model.new_cache()
        logits, cache = self.model(image, text_ids, torch.zeros_like(text_ids), incremental_state=cache)
        return (logits, *_stack(cache))


class CaptionDecoderStep(nn.Module):
    """A later incremental call: new text tokens against the stacked cache -> logits and the extended cache."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        grid = _grid(model)
        self.num_vision = 1 + grid[0] * grid[1]

    def forward(self, text_ids: Tensor, past_keys: Tensor, past_values: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        from imglish.model.layers import KVCache, LayerKV

        cache = KVCache(layers=[LayerKV(past_keys[i], past_values[i]) for i in range(past_keys.shape[0])],
                        num_vision_tokens=self.num_vision, num_text_tokens=past_keys.shape[3] - self.num_vision)
        logits, cache = self.model(None, text_ids, torch.zeros_like(text_ids), incremental_state=cache)
        return (logits, *_stack(cache))


def _grid(model: nn.Module) -> tuple[int, int]:
    size = model.config.img_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    p = model.config.patch_size
    return h // p, w // p


# ============================================================================================= inputs
def _image(model: nn.Module, batch: int, gen: torch.Generator) -> Tensor:
    size = model.config.img_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return torch.randn(batch, 3, h, w, generator=gen)


def _text(model: nn.Module, batch: int, length: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Token ids (BOS first, EOS last, the later rows shorter and padded) and their padding mask."""
    vocab = model.config.vocab_size
    ids = torch.randint(4, vocab, (batch, length), generator=gen) if vocab > 4 else torch.zeros(batch, length,
                                                                                                 dtype=torch.long)
    pad = torch.zeros(batch, length, dtype=torch.long)
    for row in range(batch):
        n = max(2, length - row % max(1, length - 1))  # row 0 full, later rows shorter
        ids[row, 0], ids[row, n - 1] = 0, 2
        ids[row, n:], pad[row, n:] = 1, 1
    return ids, pad


def example_inputs(model: nn.Module, part: str, batch: int = 2, text_len: int = 8, past_len: int = 3,
                   seed: int = 0) -> dict[str, Tensor]:
    """Inputs of ``part`` (named as in the ONNX file) for ``batch`` rows: random normalised images, token ids with
    padding in the later rows, and for ``decoder_step`` a cache made by the real encoder."""
    gen = torch.Generator().manual_seed(seed)
    task = getattr(model, "task", None)
    text_len = min(text_len, model.config.max_text_len)
    if part == "image_encoder" or (part == "model" and task == "imageclassification"):
        return {"image": _image(model, batch, gen)}
    if part == "text_encoder":
        ids, pad = _text(model, batch, text_len, gen)
        return {"text_ids": ids, "padding_mask": pad}
    if part == "model" and task == "vqav2":
        ids, pad = _text(model, batch, text_len, gen)
        return {"image": _image(model, batch, gen), "question": ids, "padding_mask": pad}
    if part == "model" and task == "nlvr2":
        ids, pad = _text(model, batch, text_len, gen)
        return {"image_a": _image(model, batch, gen), "image_b": _image(model, batch, gen), "text": ids,
                "padding_mask": pad}
    vocab = model.config.vocab_size
    # captioning: decoding feeds 2 tokens a call (BOS or the last word, then [MASK]); the graphs take any number
    new = 2 + seed % 3
    if part == "encoder":
        return {"image": _image(model, batch, gen), "text_ids": torch.randint(4, vocab, (batch, new), generator=gen)}
    if part == "decoder_step":
        with torch.no_grad():
            first = CaptionEncoder(model)(_image(model, batch, gen),
                                          torch.randint(4, vocab, (batch, past_len), generator=gen))
        return {"text_ids": torch.randint(4, vocab, (batch, new), generator=gen), "past_keys": first[1],
                "past_values": first[2]}
    raise ValueError(f"no part {part!r} for a {task!r} model")


# ============================================================================================= export
def _wrap(model: nn.Module, part: str) -> tuple[nn.Module, list[str]]:
    task = getattr(model, "task", None)
    if part not in PARTS:
        raise ValueError(f"unknown part {part!r}; expected one of {', '.join(PARTS)}")
    if task not in PARTS[part]:
        fits = [p for p, tasks in PARTS.items() if task in tasks]
        raise ValueError(f"part {part!r} exports {' or '.join(PARTS[part])} models, this is a {task or 'backbone'} "
                         "model" + (f"; its parts are {', '.join(fits)}" if fits else "; no part exports it"))
    if part == "image_encoder":
        return ImageEncoder(model), ["image_embeds"]
    if part == "text_encoder":
        return TextEncoder(model), ["text_embeds"]
    if part == "encoder":
        return CaptionEncoder(model), ["logits", "present_keys", "present_values"]
    if part == "decoder_step":
        return CaptionDecoderStep(model), ["logits", "present_keys", "present_values"]
    return {"imageclassification": Classifier, "vqav2": VQA, "nlvr2": NLVR2}[task](model), ["logits"]


def _dynamic_shapes(part: str, inputs: dict[str, Tensor], max_text: int) -> dict[str, dict[int, Any]]:
    from torch.export import Dim

    batch = Dim("batch", min=1, max=4096)
    text = Dim("text_len", min=2, max=max_text)
    shapes: dict[str, dict[int, Any]] = {}
    for name in inputs:
        if name.startswith("image"):
            shapes[name] = {0: batch}
        elif name in ("past_keys", "past_values"):
            shapes[name] = {1: batch, 3: Dim("past_len", min=2, max=4096)}
        else:
            shapes[name] = {0: batch, 1: text}
    return shapes


@dataclasses.dataclass
class ExportResult:
    """What :func:`export_onnx` wrote and found.

    Attributes:
        path: the ONNX file.
        part: the exported part.
        inputs, outputs: the graph's input and output names.
        external_data: weights in ``FILE.onnx.data`` beside it.
        seconds: export time.
        max_abs_diff: with ``verify``, per output the largest absolute difference between onnxruntime and PyTorch
            over the checked batch sizes; None otherwise.
        checked_batches: the batch sizes (and text lengths) ``verify`` ran.
    """

    path: Path
    part: str
    inputs: list[str]
    outputs: list[str]
    external_data: bool
    seconds: float
    max_abs_diff: dict[str, float] | None = None
    checked_batches: list[tuple[int, int]] = dataclasses.field(default_factory=list)


def export_module(model: nn.Module, part: str, out: str | os.PathLike, *, batch: int = 2, text_len: int = 8,
                  external_data: bool | None = None) -> ExportResult:
    """Export ``part`` of a model object (eval mode, float32, on the CPU) to ``out``."""
    model = model.eval().float().cpu()
    wrapper, output_names = _wrap(model, part)
    inputs = example_inputs(model, part, batch=batch, text_len=text_len)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    use_external = weights > EXTERNAL_DATA_BYTES if external_data is None else external_data
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    start = time.perf_counter()
    import warnings

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notes on its own internals
        program = torch.onnx.export(
            wrapper, args=(), kwargs=inputs, dynamo=True, opset_version=OPSET, input_names=list(inputs),
            output_names=output_names, dynamic_shapes=_dynamic_shapes(part, inputs, model.config.max_text_len),
            external_data=use_external, optimize=True, verbose=False,
        )
        program.save(str(tmp), external_data=use_external)
    if use_external:  # the data file is named after the file it was saved as
        data = tmp.with_name(tmp.name + ".data")
        if data.exists():
            _rename_external(tmp, data, out)
    os.replace(tmp, out)
    return ExportResult(out, part, list(inputs), output_names, use_external, time.perf_counter() - start)


def _rename_external(tmp: Path, data: Path, out: Path) -> None:
    """Point the graph's external-data references at ``OUT.data`` and move the data file there."""
    import onnx

    proto = onnx.load(str(tmp), load_external_data=False)
    target = out.name + ".data"
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = target
    os.replace(data, out.with_name(target))
    onnx.save(proto, str(tmp))


def verify_onnx(model: nn.Module, result: ExportResult, *, batches: Sequence[int] = (1, 5),
                text_lens: Sequence[int] = (5, 11), atol: float = 1e-4) -> dict[str, float]:
    """Run the file with onnxruntime (CPU) and PyTorch on the same inputs, at every batch size (and text length);
    returns per output the largest absolute difference. A difference over ``atol`` (or another output shape)
    raises ValueError naming the output, batch and difference."""
    import numpy as np

    model = model.eval().float().cpu()
    wrapper, names = _wrap(model, result.part)
    session = _session(result.path)
    worst: dict[str, float] = {n: 0.0 for n in names}
    result.checked_batches = []
    for b, t in zip(batches, text_lens):
        inputs = example_inputs(model, result.part, batch=b, text_len=t, past_len=t, seed=b)
        with torch.no_grad():
            want = wrapper(**inputs)
        want = want if isinstance(want, tuple) else (want,)
        got = session.run(names, {k: v.numpy() for k, v in inputs.items()})
        for name, w, g in zip(names, want, got):
            if tuple(g.shape) != tuple(w.shape):
                raise ValueError(f"{result.path}: output {name!r} at batch {b} has shape {tuple(g.shape)}, PyTorch "
                                 f"gives {tuple(w.shape)}")
            diff = float(np.abs(g - w.numpy()).max()) if w.numel() else 0.0
            worst[name] = max(worst[name], diff)
            if not diff <= atol:
                raise ValueError(f"{result.path}: output {name!r} at batch {b} differs from PyTorch by {diff:.3g} "
                                 f"(tolerance {atol:g})")
        result.checked_batches.append((b, t))
    result.max_abs_diff = worst
    return worst


def export_onnx(checkpoint: str | os.PathLike | nn.Module, part: str, out: str | os.PathLike, *,
                model: str | None = None, verify: bool = False, atol: float = 1e-4, batch: int = 2,
                text_len: int = 8, external_data: bool | None = None) -> ExportResult:
    """Export ``part`` of a checkpoint (or a model object) to ONNX; with ``verify`` check it with onnxruntime.

    Args:
        checkpoint: an imglish ``model.safetensors``, an official ``.pth`` (with ``model``), or a model object.
        part: see the module docstring (``image_encoder``, ``text_encoder``, ``model``, ``encoder``,
            ``decoder_step``).
        out: the ``.onnx`` file (written atomically).
        model: the registered model name of an official checkpoint.
        verify: run the file with onnxruntime at batch sizes 1 and 5 (and two text lengths) and compare with
            PyTorch; a difference over ``atol`` raises ValueError.
        batch, text_len: the example shapes traced (the exported graph is dynamic in both).
        external_data: force (True) or forbid (False) external data; default: only over 2 GB of weights.

    Raises:
        FileNotFoundError: no such checkpoint; ValueError: a part the model does not have, or a failed check.
    """
    from imglish.inference.pipeline import _positive_int

    _positive_int(batch, "batch")
    if isinstance(text_len, bool) or not isinstance(text_len, int) or text_len < 2:
        raise ValueError(f"text_len must be an integer of at least 2 (BOS and EOS), got {text_len!r}")
    if not atol > 0:
        raise ValueError(f"atol must be a positive number, got {atol!r}")
    if isinstance(checkpoint, nn.Module):
        net = checkpoint
    else:
        import imglish

        path = Path(checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
        net = imglish.create_model(model, pretrained=str(path)) if model else _load_ours(path)
    _wrap(net, part)  # a clear error before the (slow) export
    _require_extras(verify)
    result = export_module(net, part, out, batch=batch, text_len=text_len, external_data=external_data)
    if verify:
        verify_onnx(net, result, atol=atol)
    return result


def _require_extras(verify: bool) -> None:
    """The exporter needs onnxscript (and onnx); ``verify`` needs onnxruntime: name the missing one and the extra."""
    import importlib.util

    for name in ("onnx", "onnxscript") + (("onnxruntime",) if verify else ()):
        if importlib.util.find_spec(name) is None:
            raise ValueError(f"export needs the package {name!r}: pip install 'imglish[export]'")


def _load_ours(path: Path) -> nn.Module:
    import imglish
    from imglish.model.loading import read_checkpoint_metadata

    try:
        meta = read_checkpoint_metadata(str(path))
    except Exception as err:  # noqa: BLE001 - named in the message
        raise ValueError(f"checkpoint {str(path)!r} cannot be read: {err}") from None
    if meta.get("format") != "imglish/1":
        raise ValueError(f"{path} is not an imglish checkpoint (no imglish metadata): pass the registered model name "
                         "(--model, e.g. beit3_base_patch16_384_retrieval)")
    net, _ = imglish.create_model_and_processor(None, str(path))
    return net


# ============================================================================================= running captioning
def _session(graph: Any, threads: int = 0) -> Any:
    """An onnxruntime CPU session of a file (``threads`` intra-op threads, 0: onnxruntime's choice); a session is
    returned as it is."""
    if not isinstance(graph, (str, os.PathLike)):
        return graph  # an onnxruntime.InferenceSession already
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(graph), opts, providers=["CPUExecutionProvider"])


def onnx_greedy_search(encoder: Any, decoder_step: Any, image: Any, config: Any = None) -> Any:
    """Greedy captioning with the two exported graphs, the loop of :func:`imglish.generation.greedy_search` in
    numpy: feed ``[BOS, MASK]`` with the image to ``encoder``, then ``[word, MASK]`` to ``decoder_step``, taking
    the argmax at the MASK slot and dropping the MASK's cached key/value after each step.

    Args:
        encoder, decoder_step: paths of the exported files or onnxruntime sessions.
        image: (B, 3, S, S) float32 normalised pixels (numpy or a tensor).
        config: an :class:`imglish.generation.GenerationConfig` (its ids, ``max_len`` and ``suppress_ids``;
            ``num_beams`` is ignored).

    Returns:
        (B, max_len) int64 numpy array, as ``greedy_search`` returns: BOS, the words, EOS, then padding.
    """
    import numpy as np

    from imglish.generation import GenerationConfig

    cfg = config or GenerationConfig()
    enc, dec = _session(encoder), _session(decoder_step)
    image = image.numpy() if isinstance(image, Tensor) else np.asarray(image)
    batch = image.shape[0]
    out = np.full((batch, cfg.max_len), cfg.pad_token_id, dtype=np.int64)
    out[:, 0] = cfg.bos_token_id
    finished = np.zeros(batch, dtype=bool)
    mask = np.full((batch, 1), cfg.mask_token_id, dtype=np.int64)
    words = np.concatenate([out[:, :1], mask], axis=1)
    keys = values = None
    for pos in range(1, cfg.max_len):
        if keys is None:
            logits, keys, values = enc.run(None, {"image": image.astype(np.float32), "text_ids": words})
        else:
            logits, keys, values = dec.run(None, {"text_ids": words, "past_keys": keys, "past_values": values})
        scores = logits[:, -1].astype(np.float64)
        if cfg.suppress_ids:
            scores[:, list(cfg.suppress_ids)] = -np.inf
        if pos == cfg.max_len - 1:
            next_word = np.full(batch, cfg.eos_token_id, dtype=np.int64)
        else:
            next_word = scores.argmax(axis=-1)
        next_word = np.where(finished, cfg.pad_token_id, next_word)
        out[:, pos] = next_word
        finished |= next_word == cfg.eos_token_id
        if finished.all():
            break
        keys, values = keys[:, :, :, :-1], values[:, :, :, :-1]  # the MASK's position
        words = np.concatenate([next_word[:, None], mask], axis=1)
    return out
