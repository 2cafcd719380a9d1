"""The block walk: the one place that knows a model's structure (SPEC §7).

Stage 1, stage 2, OWL and evaluation are clients of this module; none of them walks a model itself.

Units. The repeated block lists of a model are its ``nn.ModuleList``s of at least two blocks that
hold prunable matrices, the outermost ones; one list is a *stack* (a tower: vision, Q-Former,
language; an encoder, a decoder). Stacks are ordered by their first call in a real forward.

Prunable matrices of a block (each an ``[out, in]`` view of live parameter data, see :class:`Matrix`):
  * ``nn.Linear`` weights;
  * ``transformers.pytorch_utils.Conv1D`` weights, stored ``[in, out]`` (the matrix is the transpose);
  * fused mixture-of-experts parameters ``[E, out, in]`` (or ``[E, in, out]``), one matrix per expert.
    Which 3-D parameters are experts, and their orientation, is learned in the dry forward from how
    the model uses them: ``F.linear(x, P[e])`` or ``x @ P[e]`` on a slice of the parameter.
Routers (Linear gates with at most as many outputs as the block has experts, router modules),
norms, biases, embeddings and heads stay dense; :attr:`Plan.dense` names each with the reason.

Inputs. Every block's own positional and keyword arguments are captured on its own call, for every
calibration batch, with caches off: masks, rotary tables and local/global attention differ per block
(Gemma-2/3), so block 0's arguments are never reused for another block. Capturing runs the model's
own forward and stops it at the last block of the stack being walked. When the dry forward shows
that no block argument depends on what earlier blocks of the stack compute (true of nearly every
decoder), the stack's blocks are replaced by the identity during capture, so capturing costs about
an embedding lookup; otherwise (T5's position biases are returned by block 0) they run for real.

Validation comes first: :func:`plan` does the discovery and one dry forward and raises
:class:`WalkError` (a one-line ``ValueError`` naming the class and what was not understood) before a
single weight is touched.
"""

from __future__ import annotations

import contextlib
import inspect
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

# More than this fraction of the block matrices left dense (without the user asking) is an error.
MAX_UNTOUCHED = 0.20


class WalkError(ValueError):
    """A model the walk does not fully understand; raised before any weight is touched."""


def _conv1d_class():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return ()
    return (Conv1D,)


CONV1D = _conv1d_class()


# ----------------------------------------------------------------------------------------------
# the plan
# ----------------------------------------------------------------------------------------------
@dataclass(eq=False)
class Matrix:
    """One prunable matrix: a live ``[out, in]`` view of a parameter (or of one expert's slice).

    ``name`` is the module name for Linear / Conv1D weights and ``"<parameter>[e]"`` for expert e
    of a fused parameter; it keys sparsity maps and reports.
    """

    name: str
    param_name: str
    module: nn.Module
    attr: str
    kind: str  # "linear", "conv1d" or "expert"
    expert: int | None = None
    transposed: bool = False
    block: Block | None = field(default=None, repr=False)

    @property
    def param(self) -> torch.Tensor:
        return getattr(self.module, self.attr)

    def view_of(self, t: torch.Tensor) -> torch.Tensor:
        """The ``[out, in]`` view of this matrix in a tensor shaped like its parameter (the
        parameter's data, its gradient)."""
        if self.expert is not None:
            t = t[self.expert]
        return t.t() if self.transposed else t

    def weight(self) -> torch.Tensor:
        """``[out, in]`` view of the live parameter data (writes go to the model)."""
        return self.view_of(self.param.data)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight().shape)

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def numel(self) -> int:
        return self.weight().numel()


@dataclass(eq=False)
class Block:
    stack: Stack = field(repr=False)
    index: int
    path: str
    module: nn.Module = field(repr=False)
    matrices: list[Matrix] = field(default_factory=list, repr=False)
    output_len: int | None = None  # None: returns a tensor; else the length of the tuple it returns
    n_experts: int = 0

    @property
    def key(self) -> str:
        """'<stack path>.<index>': the group key of block-level allocation."""
        return self.path


@dataclass(eq=False)
class Stack:
    path: str
    name: str
    modules: nn.ModuleList = field(repr=False)
    blocks: list[Block] = field(default_factory=list, repr=False)
    stub_capture: bool = False
    plan: Plan | None = field(default=None, repr=False)


@dataclass
class DenseParam:
    name: str
    numel: int
    reason: str
    in_block: bool


@dataclass(eq=False)
class Plan:
    """What the walk understood of a model: its stacks in forward order, every prunable matrix,
    and every parameter that stays dense with the reason."""

    model_class: str
    stacks: list[Stack]
    dense: list[DenseParam]
    notes: list[str] = field(default_factory=list)
    experts: dict[str, int] = field(default_factory=dict)  # fused parameter name -> number of experts
    loader: object | None = field(default=None, repr=False)  # stream.BlockLoader of a streamed model
    unselected: list[Stack] = field(default_factory=list, repr=False)  # towers left dense (select_towers)

    @property
    def blocks(self) -> list[Block]:
        return [b for s in self.stacks for b in s.blocks]

    def matrices(self) -> dict[str, Matrix]:
        return {m.name: m for b in self.blocks for m in b.matrices}

    def block_of(self, matrix_name: str) -> str:
        return self.matrices()[matrix_name].block.key

    @property
    def prunable_numel(self) -> int:
        return sum(m.numel for b in self.blocks for m in b.matrices)

    @property
    def block_matrix_numel(self) -> int:
        """Every element of a >= 2-D parameter inside the blocks (prunable or not)."""
        return self.prunable_numel + sum(d.numel for d in self.dense if d.in_block and d.reason != "vector")

    def coverage(self) -> float:
        total = self.block_matrix_numel
        return self.prunable_numel / total if total else 0.0

    def summary(self) -> dict:
        """JSON-ready description (report.json, ``ecoflap-fast inspect``)."""
        by_reason: dict[str, list[str]] = defaultdict(list)
        numel_by_reason: dict[str, int] = defaultdict(int)
        for d in self.dense:
            by_reason[d.reason].append(d.name)
            numel_by_reason[d.reason] += d.numel
        return {
            "model_class": self.model_class,
            "stacks": [
                {
                    "path": s.path,
                    "name": s.name,
                    "blocks": len(s.blocks),
                    "capture": "identity stubs" if s.stub_capture else "full blocks",
                    "matrices_per_block": len(s.blocks[0].matrices) if s.blocks else 0,
                    "prunable_numel": sum(m.numel for b in s.blocks for m in b.matrices),
                }
                for s in self.stacks
            ],
            "prunable_matrices": sum(len(b.matrices) for b in self.blocks),
            "prunable_numel": self.prunable_numel,
            "block_matrix_numel": self.block_matrix_numel,
            "coverage_of_block_matrices": self.coverage(),
            "experts": dict(self.experts),
            "towers_left_dense": [{"name": s.name, "path": s.path} for s in self.unselected],
            "dense": {r: {"numel": numel_by_reason[r], "names": names} for r, names in sorted(by_reason.items())},
            "notes": list(self.notes),
        }


# ----------------------------------------------------------------------------------------------
# running the model
# ----------------------------------------------------------------------------------------------
def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _accepts(model: nn.Module, name: str) -> bool:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind == p.VAR_KEYWORD for p in params.values())


def takes_argument(model: nn.Module, name: str) -> bool:
    """Whether ``model.forward`` names ``name`` among its parameters (``**kwargs`` does not count)."""
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def forward(model: nn.Module, batch: dict, **extra):
    """The model's own forward on one batch of model inputs, caches off."""
    kwargs = to_device(batch, model_device(model))
    if _accepts(model, "use_cache") and "use_cache" not in kwargs:
        kwargs["use_cache"] = False
    kwargs.update(extra)
    return model(**kwargs)


def as_batches(calibration, batch_size: int, from_ids=None) -> list[dict]:
    """Calibration as a list of model-input dicts. Token windows ``[n, T]`` are split into batches
    (``from_ids`` turns one ``[b, T]`` chunk into model inputs, default ``{"input_ids": chunk}``);
    a dict is one batch; a list of dicts or tensors is used as given."""
    from_ids = from_ids or (lambda ids: {"input_ids": ids})
    if isinstance(calibration, torch.Tensor):
        if calibration.dim() != 2 or calibration.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"calibration token windows must be an integer tensor [n, seqlen], got {calibration.dtype} "
                f"{tuple(calibration.shape)}"
            )
        return [from_ids(c) for c in calibration.split(batch_size)]
    if isinstance(calibration, dict):
        return [calibration]
    out = []
    for i, b in enumerate(calibration):
        if isinstance(b, torch.Tensor):
            out.append(from_ids(b if b.dim() == 2 else b.unsqueeze(0)))
        elif isinstance(b, dict):
            out.append(b)
        else:
            raise TypeError(f"calibration batch {i} must be a dict of model inputs or a tensor, got {type(b).__name__}")
    if not out:
        raise ValueError("calibration is empty")
    return out


def dry_batch(batch: dict) -> dict:
    """The first sample of a batch for the dry forward, when every tensor in it is indexed by sample
    along dim 0 (token batches); otherwise (packed image patches, grids) the batch as it is."""
    tensors = [v for v in batch.values() if isinstance(v, torch.Tensor) and v.dim()]
    sizes = {v.shape[0] for v in tensors}
    if len(sizes) != 1 or sizes == {1}:
        return batch
    return {k: v[:1] if isinstance(v, torch.Tensor) and v.dim() else v for k, v in batch.items()}


def _first(y):
    return y[0] if isinstance(y, (tuple, list)) else y


def _split_hidden(args: tuple, kwargs: dict):
    """(hidden, other positional args, kwargs without the hidden states) of a block call."""
    if args:
        return args[0], tuple(args[1:]), dict(kwargs)
    kwargs = dict(kwargs)
    if "hidden_states" not in kwargs:
        return None, (), kwargs
    return kwargs.pop("hidden_states"), (), kwargs


def _is_cache(v) -> bool:
    try:
        from transformers.cache_utils import Cache
    except ImportError:  # pragma: no cover
        return False
    return isinstance(v, Cache)


_CACHE_KWARGS = ("past_key_values", "past_key_value", "layer_past", "cache_params")


def _drop_caches(kwargs: dict) -> dict:
    for k in _CACHE_KWARGS:
        if k in kwargs and kwargs[k] is not None:
            kwargs[k] = None
    for k, v in list(kwargs.items()):
        if _is_cache(v):
            kwargs[k] = None
    return kwargs


class _Stop(Exception):
    pass


@contextlib.contextmanager
def _eager_experts(model: nn.Module):
    """Run fused experts through transformers' eager implementation (per-expert F.linear calls on
    slices of the fused parameters), which the statistics rely on; restored afterwards."""
    configs, seen = [], set()
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and id(cfg) not in seen and hasattr(cfg, "_experts_implementation"):
            seen.add(id(cfg))
            configs.append((cfg, cfg._experts_implementation))
    try:
        for cfg, _ in configs:
            if cfg._experts_implementation not in (None, "eager"):
                cfg._experts_implementation = "eager"
        yield
    finally:
        for cfg, old in configs:
            if cfg._experts_implementation != old:
                cfg._experts_implementation = old


class _ExpertCalls(TorchFunctionMode):
    """Sees ``F.linear(x, P[e])`` and ``x @ P[e]`` on slices of fused 3-D expert parameters and
    reports ``(parameter name, expert, transposed, x)`` to ``on_call``."""

    def __init__(self, owners: dict[str, tuple[nn.Module, str]], on_call):
        super().__init__()
        self.owners = owners  # parameter name -> (owning module, attribute)
        self.params: dict[int, tuple[str, torch.Tensor]] = {}
        self.on_call = on_call

    def _lookup(self, base):
        hit = self.params.get(id(base))
        if hit is None or hit[1] is not base:  # parameters replaced (streamed blocks): look again
            self.params = {id(getattr(m, a)): (n, getattr(m, a)) for n, (m, a) in self.owners.items()}
            hit = self.params.get(id(base))
        return hit

    def _find(self, w):
        """(parameter name, expert, parameter) of a 2-D view of one expert's slice. The parameter is
        found by identity (the view's base), the expert from the view's offset into its data."""
        if not isinstance(w, torch.Tensor) or w.dim() != 2 or w._base is None:
            return None
        hit = self._lookup(w._base)
        if hit is None:
            return None
        name, p = hit
        if tuple(w.shape) not in (tuple(p.shape[1:]), tuple(p.shape[1:])[::-1]):
            return None
        return name, (w.storage_offset() - p.storage_offset()) // p.stride(0), p

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and len(args) >= 2:
            hit = self._find(args[1])
            if hit is not None:
                name, e, p = hit
                # F.linear(x, W): W is [out, in]; a slice stored [in, out] would arrive transposed
                self.on_call(name, e, args[1].shape != p.shape[1:], args[0])
        elif func in (torch.matmul, torch.Tensor.__matmul__, torch.mm) and len(args) >= 2:
            hit = self._find(args[1])
            if hit is not None:
                name, e, p = hit
                # x @ W: W is [in, out]; the parameter slice as stored is [in, out] unless it was .t()'d
                self.on_call(name, e, args[1].shape == p.shape[1:], args[0])
        return func(*args, **kwargs)


# ----------------------------------------------------------------------------------------------
# discovery
# ----------------------------------------------------------------------------------------------
def _has_matrices(module: nn.Module) -> bool:
    for m in module.modules():
        if isinstance(m, nn.Linear) or (CONV1D and isinstance(m, CONV1D)):
            return True
        if any(p.dim() == 3 for p in m.parameters(recurse=False)):
            return True
    return False


def _candidate_lists(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """Outermost ModuleLists of >= 2 non-leaf children holding prunable matrices, in module order."""
    found: list[tuple[str, nn.ModuleList]] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 2:
            continue
        if any(name.startswith(f"{p}.") for p, _ in found):
            continue  # inside a block of an outer list (e.g. an experts list)
        children = list(module)
        if all(len(list(c.children())) > 0 and _has_matrices(c) for c in children):
            found.append((name, module))
    return found


def _stack_name(path: str, model: nn.Module) -> str:
    """A short tower name from the list's path and the model's kind: vision, qformer, text (the text
    encoder of a dual encoder), language (a generative model's language model), encoder, decoder."""
    p = path.lower()
    generative = model.get_output_embeddings() is not None if hasattr(model, "get_output_embeddings") else False
    images_only = takes_argument(model, "pixel_values") and not takes_argument(model, "input_ids")
    for key, name in (
        ("qformer", "qformer"),
        ("vision", "vision"),
        ("visual", "vision"),
        ("image", "vision"),
        ("language", "language"),
        ("text_model", "language" if generative else "text"),
        ("text", "language" if generative else "text"),
        ("encoder", "vision" if images_only else "encoder"),
        ("decoder", "decoder"),
    ):
        if key in p:
            return name
    if images_only:
        return "vision"
    cfg = getattr(model, "config", None)
    return "language" if getattr(cfg, "is_decoder", False) or hasattr(model, "lm_head") or generative else "main"


def _unique_names(stacks: list[Stack]) -> None:
    """Stack names are tower names users pick (``PruneConfig.towers``): a repeated name gets -2, -3..."""
    seen: dict[str, int] = defaultdict(int)
    for s in stacks:
        seen[s.name] += 1
        if seen[s.name] > 1:
            s.name = f"{s.name}-{seen[s.name]}"


def _module_class(model: nn.Module) -> str:
    return type(model).__name__


def plan(model: nn.Module, sample_batch: dict, loader=None) -> Plan:
    """Discovery, one dry forward on ``sample_batch``, and the plan; nothing in the model changes.
    ``loader`` (a ``stream.BlockLoader``): the model is a streamed skeleton whose blocks are read on
    their call.

    Raises :class:`WalkError` naming the model class and what was not understood.
    """
    cls = _module_class(model)
    lists = _candidate_lists(model)
    if not lists:
        raise WalkError(f"{cls}: no repeated transformer blocks found (no ModuleList of blocks holding Linear weights)")
    block_of_module = {}
    for path, ml in lists:
        for i, b in enumerate(ml):
            block_of_module[id(b)] = (path, i)
    fused = {}
    for path, ml in lists:
        for i, b in enumerate(ml):
            for mn, m in b.named_modules():
                for pn, p in m.named_parameters(recurse=False):
                    if p.dim() == 3:
                        fused[f"{path}.{i}.{mn}.{pn}" if mn else f"{path}.{i}.{pn}"] = (m, pn)

    calls: list[tuple[str, int]] = []
    records: dict[tuple[str, int], dict] = {}
    handles = []

    def pre(module, args, kwargs):
        key = block_of_module[id(module)]
        calls.append(key)
        hidden, rest, kw = _split_hidden(args, kwargs)
        records.setdefault(key, {"hidden": hidden, "rest": rest, "kwargs": kw, "count": 0})
        records[key]["count"] += 1

    def post(module, args, kwargs, output):
        key = block_of_module[id(module)]
        records[key].setdefault("output", output)

    expert_use: dict[str, set] = defaultdict(set)

    def on_expert(name, e, transposed, x):
        expert_use[name].add(bool(transposed))

    for path, ml in lists:
        for b in ml:
            handles.append(b.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(b.register_forward_hook(post, with_kwargs=True))
    was_training = model.training
    model.eval()
    try:
        paths = [f"{path}.{i}" for path, ml in lists for i in range(len(ml))]
        demand = loader.on_demand(paths) if loader is not None else contextlib.nullcontext()
        with torch.no_grad(), _eager_experts(model), _ExpertCalls(fused, on_expert), demand:
            forward(model, sample_batch)
    except WalkError:
        raise
    except Exception as e:
        raise WalkError(f"{cls}: the dry forward on the first calibration batch failed: {type(e).__name__}: {e}") from e
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)

    # stacks in forward order; every block of a called stack exactly once, in index order
    order: list[str] = []
    for path, _ in calls:
        if path not in order:
            order.append(path)
    modules = dict(lists)
    stacks: list[Stack] = []
    notes: list[str] = []
    for path in order:
        ml = modules[path]
        seq = [i for p, i in calls if p == path]
        counts = {i: records[(path, i)]["count"] for i in range(len(ml)) if (path, i) in records}
        if any(c != 1 for c in counts.values()):
            i, c = next((i, c) for i, c in counts.items() if c != 1)
            raise WalkError(
                f"{cls}: block {path}.{i} is called {c} times in one forward (shared blocks are not supported)"
            )
        if seq != list(range(len(ml))):
            missing = sorted(set(range(len(ml))) - set(seq))
            what = f"blocks {missing} are never called" if missing else f"blocks run in the order {seq}"
            raise WalkError(f"{cls}: in {path}, {what}; the walk needs every block once, in order")
        stack = Stack(path, _stack_name(path, model), ml)
        for i in range(len(ml)):
            r = records[(path, i)]
            h, out = r["hidden"], _first(r.get("output"))
            if not isinstance(h, torch.Tensor) or not h.is_floating_point():
                raise WalkError(f"{cls}: block {path}.{i} takes no hidden-state tensor as its first argument")
            if not isinstance(out, torch.Tensor) or out.shape != h.shape:
                raise WalkError(
                    f"{cls}: block {path}.{i} returns {type(out).__name__} "
                    f"{tuple(out.shape) if isinstance(out, torch.Tensor) else ''} for hidden states {tuple(h.shape)}"
                )
            if i and not torch.equal(_first(records[(path, i - 1)]["output"]), h):
                raise WalkError(
                    f"{cls}: the hidden states change between blocks {path}.{i - 1} and {path}.{i} "
                    "(computation between blocks is not supported)"
                )
            output = r["output"]
            out_len = None if isinstance(output, torch.Tensor) else len(output)
            stack.blocks.append(Block(stack, i, f"{path}.{i}", ml[i], output_len=out_len))
        stacks.append(stack)
    _unique_names(stacks)
    never = [p for p, _ in lists if p not in order]
    for p in never:
        notes.append(f"{p} ({len(modules[p])} blocks) was not run by the calibration inputs and stays dense")

    # prunable matrices of every block
    experts: dict[str, int] = {}
    matrix_params: set[int] = set()
    for stack in stacks:
        for block in stack.blocks:
            _block_matrices(block, expert_use, experts, matrix_params)
    dense = _dense_params(model, lists, [b for s in stacks for b in s.blocks], matrix_params)
    for p in never:
        for d in dense:
            if d.name.startswith(p + "."):
                d.reason = "stack not run"
    if stacks:
        _decide_capture(model, stacks, sample_batch, records, loader)
    result = Plan(cls, stacks, dense, notes, experts, loader)
    for stack in stacks:
        stack.plan = result
    total = result.block_matrix_numel
    untouched = 1 - result.coverage() if total else 1.0
    if untouched > MAX_UNTOUCHED:
        worst = sorted((d for d in dense if d.in_block and d.reason != "vector"), key=lambda d: -d.numel)
        named = ", ".join(f"{d.name} ({d.reason})" for d in worst[:3])
        raise WalkError(
            f"{cls}: the plan would leave {untouched:.0%} of the block weights unpruned (largest: {named}); "
            f"at most {MAX_UNTOUCHED:.0%} may stay dense"
        )
    return result


def select_towers(plan_: Plan, names) -> Plan:
    """The plan restricted to the stacks named ``names`` (tower names, ``Stack.name``); the other
    stacks stay dense: their matrices join :attr:`Plan.dense` and :attr:`Plan.unselected` lists them.
    The model's forward still runs them (dense) to feed the selected towers. ``names`` None: all."""
    if names is None:
        return plan_
    known = [s.name for s in plan_.stacks]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise WalkError(
            f"{plan_.model_class}: no tower named {', '.join(map(repr, unknown))}; its towers are {', '.join(known)}"
        )
    chosen = [s for s in plan_.stacks if s.name in names]
    left = [s for s in plan_.stacks if s.name not in names]
    dense = list(plan_.dense) + [
        DenseParam(m.param_name, m.param.numel(), "tower not selected", True)
        for s in left
        for b in s.blocks
        for m in b.matrices
        if m.expert in (None, 0)  # a fused parameter once
    ]
    notes = list(plan_.notes) + [f"{s.path} ({s.name}) is not selected and stays dense" for s in left]
    experts = {k: v for k, v in plan_.experts.items() if not any(k.startswith(f"{s.path}.") for s in left)}
    return Plan(plan_.model_class, chosen, dense, notes, experts, plan_.loader, left)


def structure(model: nn.Module) -> Plan:
    """The plan without a forward (exports, reports of saved models): stacks in module order, fused
    3-D parameters taken as experts stored as the module declares (``is_transposed``)."""
    lists = _candidate_lists(model)
    if not lists:
        raise WalkError(f"{_module_class(model)}: no repeated transformer blocks found")
    stacks, experts, matrix_params = [], {}, set()
    for path, ml in lists:
        stack = Stack(path, _stack_name(path, model), ml)
        for i, b in enumerate(ml):
            block = Block(stack, i, f"{path}.{i}", b)
            _block_matrices(block, None, experts, matrix_params)
            stack.blocks.append(block)
        stacks.append(stack)
    _unique_names(stacks)
    dense = _dense_params(model, lists, [b for s in stacks for b in s.blocks], matrix_params)
    return Plan(_module_class(model), stacks, dense, [], experts)


def _block_matrices(block: Block, expert_use: dict | None, experts: dict, matrix_params: set) -> None:
    prefix = block.path
    n_experts = 0
    fused_here = {}
    for pn, p in block.module.named_parameters():
        full = f"{prefix}.{pn}"
        if p.dim() != 3:
            continue
        if expert_use is None:  # static structure: the module says how it is stored
            owner = block.module.get_submodule(pn.rpartition(".")[0]) if "." in pn else block.module
            fused_here[pn] = (p, bool(getattr(owner, "is_transposed", False)))
        elif full in expert_use:
            if len(expert_use[full]) != 1:
                raise WalkError(f"expert parameter {full} is used both as [out, in] and as [in, out]")
            fused_here[pn] = (p, next(iter(expert_use[full])))
        else:
            continue
        n_experts = max(n_experts, p.shape[0])
    expert_lists = [
        m for n, m in block.module.named_modules() if isinstance(m, nn.ModuleList) and "expert" in n.rsplit(".", 1)[-1]
    ]
    for ml in expert_lists:
        n_experts = max(n_experts, len(ml))
    block.n_experts = n_experts
    for mn, m in block.module.named_modules():
        full = f"{prefix}.{mn}" if mn else prefix
        if isinstance(m, nn.Linear) and m.weight.dim() == 2:
            leaf = mn.rsplit(".", 1)[-1].lower()
            if n_experts and m.out_features <= n_experts and ("gate" in leaf or "router" in leaf):
                continue  # a router: stays dense
            block.matrices.append(Matrix(full, f"{full}.weight", m, "weight", "linear", block=block))
            matrix_params.add(id(m.weight))
        elif CONV1D and isinstance(m, CONV1D):
            block.matrices.append(Matrix(full, f"{full}.weight", m, "weight", "conv1d", transposed=True, block=block))
            matrix_params.add(id(m.weight))
    for pn, (p, transposed) in fused_here.items():
        mod_name, _, attr = pn.rpartition(".")
        mod = block.module.get_submodule(mod_name) if mod_name else block.module
        full = f"{prefix}.{pn}"
        experts[full] = p.shape[0]
        for e in range(p.shape[0]):
            block.matrices.append(Matrix(f"{full}[{e}]", full, mod, attr, "expert", e, transposed, block=block))
        matrix_params.add(id(p))


def _dense_params(model, lists, blocks: list[Block], matrix_params: set) -> list[DenseParam]:
    in_block_prefixes = [f"{p}." for p, _ in lists]
    experts_of = {f"{b.path}.": b.n_experts for b in blocks}
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_ids = {id(out_emb.weight)} if out_emb is not None and getattr(out_emb, "weight", None) is not None else set()
    owner = {}
    for mn, m in model.named_modules():
        for pn, p in m.named_parameters(recurse=False):
            owner[f"{mn}.{pn}" if mn else pn] = m
    dense = []
    for name, p in model.named_parameters():
        if id(p) in matrix_params:
            continue
        in_block = any(name.startswith(pre) for pre in in_block_prefixes)
        n_experts = next((e for pre, e in experts_of.items() if name.startswith(pre)), 0)
        m = owner.get(name)
        cls = type(m).__name__.lower() if m is not None else ""
        if id(p) in head_ids:
            reason = "head"
        elif p.dim() < 2 or name.endswith("bias"):
            reason = "vector"  # norms, biases, scales: never pruned
        elif isinstance(m, nn.Embedding) or (not in_block and "embed" in name.lower()):
            reason = "embedding"
        elif in_block and ("router" in cls or (n_experts and p.dim() == 2 and p.shape[0] <= n_experts)):
            reason = "router"
        elif in_block:
            reason = f"not understood ({type(m).__name__} parameter used outside Linear/Conv1D/expert calls)"
        else:
            reason = "outside the blocks (heads, projections, patch embeddings)"
        dense.append(DenseParam(name, p.numel(), reason, in_block))
    return dense


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if _is_cache(a) and _is_cache(b):
        return True
    return a == b if not callable(a) else a is b


def _decide_capture(model, stacks: list[Stack], batch: dict, records: dict, loader=None) -> None:
    """A stack is captured with identity stubs when a dry forward with its blocks stubbed (the hidden
    states back, Nones for anything else a block returns) gives every block the same arguments as
    the real forward did; otherwise its blocks run for real while capturing."""
    for stack in stacks:
        try:
            got = _capture_calls(model, stack, [batch], stub=True, loader=loader, stacks=stacks)[0]
        except Exception:
            continue  # the model's code needs what the blocks return beside the hidden states
        stack.stub_capture = all(
            _same(got.calls[b.index][0], records[(stack.path, b.index)]["rest"])
            and _same(
                _drop_caches(dict(got.calls[b.index][1])), _drop_caches(dict(records[(stack.path, b.index)]["kwargs"]))
            )
            for b in stack.blocks
        )


# ----------------------------------------------------------------------------------------------
# captured inputs and block execution
# ----------------------------------------------------------------------------------------------
@dataclass
class StackInputs:
    """One calibration batch at the current block: its hidden states, and every block's own other
    arguments ``calls[i] = (positional args after the hidden states, keyword args)``."""

    hidden: torch.Tensor
    calls: list[tuple[tuple, dict]]


def _identity(block: Block):
    """Identity in place of ``block.forward``: the hidden states back, in the block's output form."""
    if block.output_len is None:
        return lambda hidden, *a, **k: hidden
    n = block.output_len
    return lambda hidden, *a, **k: (hidden,) + (None,) * (n - 1)


@contextlib.contextmanager
def skipped(blocks: list[Block]):
    """Within: every block in ``blocks`` returns its hidden states unchanged (nests: a block skipped by
    an outer context stays skipped when an inner one ends)."""
    saved = [(b, b.module.__dict__.get("forward")) for b in blocks]
    try:
        for b in blocks:
            b.module.forward = _identity(b)
        yield
    finally:
        for b, before in reversed(saved):
            if before is None:
                b.module.__dict__.pop("forward", None)
            else:
                b.module.forward = before


@contextlib.contextmanager
def starting_at(block: Block, hidden: torch.Tensor):
    """Within: the model's own forward feeds ``block`` with ``hidden`` (e.g. cached dense inputs) and,
    when the plan allows, skips the blocks before it in its stack, so a forward costs only the
    blocks from ``block`` on and the model's own remainder (final norm, head, later towers)."""

    def feed(_m, args, kwargs):
        if args:
            return (hidden, *args[1:]), kwargs
        return args, dict(kwargs, hidden_states=hidden)

    handle = block.module.register_forward_pre_hook(feed, with_kwargs=True)
    earlier = block.stack.blocks[: block.index]
    skip = earlier if block.stack.stub_capture else []
    plan_ = block.stack.plan
    demand = on_demand(plan_, [b for b in plan_.blocks if b not in skip]) if plan_ is not None else None
    try:
        with skipped(skip), demand if demand is not None else contextlib.nullcontext():
            yield
    finally:
        handle.remove()


def _capture_calls(
    model, stack: Stack, batches: list[dict], *, stub: bool, loader=None, stacks=None
) -> list[StackInputs]:
    out: list[StackInputs] = []
    last = len(stack.blocks) - 1
    state: dict = {}

    def pre(module, args, kwargs, i):
        hidden, rest, kw = _split_hidden(args, kwargs)
        if i == 0:
            state["hidden"] = hidden
        state["calls"][i] = (rest, _drop_caches(kw))
        if i == last:
            raise _Stop

    handles = [
        b.module.register_forward_pre_hook(lambda m, a, k, i=b.index: pre(m, a, k, i), with_kwargs=True)
        for b in stack.blocks
    ]
    try:
        running = [b.path for s in stacks or [] for b in s.blocks if s is not stack or not stub]
        demand = loader.on_demand(running) if loader is not None else contextlib.nullcontext()
        with skipped(stack.blocks[:-1] if stub else []), torch.no_grad(), demand:
            for batch in batches:
                state.clear()
                state["calls"] = [None] * len(stack.blocks)
                try:
                    forward(model, batch)
                except _Stop:
                    pass
                else:
                    raise WalkError(f"{_module_class(model)}: the last block of {stack.path} was never reached")
                out.append(StackInputs(state["hidden"], state["calls"]))
    finally:
        for h in handles:
            h.remove()
    return out


def capture(model: nn.Module, stack: Stack, batches: list[dict]) -> list[StackInputs]:
    """Every block's own arguments and the first block's hidden states, per calibration batch, from
    the model's own forward (the stacks before ``stack`` run as they are now, e.g. already pruned)."""
    was = model.training
    model.eval()
    try:
        plan_ = stack.plan
        return _capture_calls(
            model,
            stack,
            batches,
            stub=stack.stub_capture,
            loader=plan_.loader if plan_ is not None else None,
            stacks=plan_.stacks if plan_ is not None else [stack],
        )
    finally:
        model.train(was)


def on_demand(plan_: Plan, blocks: list[Block] | None = None):
    """Within: a streamed model's blocks (all, or ``blocks``) are read on their call and freed after;
    nothing for a model in memory."""
    if plan_.loader is None:
        return contextlib.nullcontext()
    return plan_.loader.on_demand([b.path for b in (blocks if blocks is not None else plan_.blocks)])


@contextlib.contextmanager
def holding(block: Block):
    """Within: ``block``'s weights are in memory (read from the checkpoint for a streamed model and
    freed at the end)."""
    loader = block.stack.plan.loader if block.stack.plan is not None else None
    if loader is None:
        yield
        return
    with loader.hold(block.path):
        yield


def run_block(block: Block, inp: StackInputs, hidden: torch.Tensor | None = None) -> torch.Tensor:
    """The block on one batch's captured inputs; returns its output hidden states."""
    rest, kwargs = inp.calls[block.index]
    return _first(block.module(inp.hidden if hidden is None else hidden, *rest, **kwargs))


@torch.no_grad()
def advance(block: Block, inputs: list[StackInputs]) -> list[StackInputs]:
    """The inputs of the next block: every batch run through ``block`` as it is now."""
    for inp in inputs:
        inp.hidden = run_block(block, inp)
    return inputs


@torch.no_grad()
def block_statistics(model: nn.Module, block: Block, inputs: list[StackInputs], make_stat) -> tuple[dict, dict]:
    """Run ``block`` on every batch with the input statistic of each of its matrices accumulated:
    ``make_stat(in_features, device)`` objects with ``.add(x)``, keyed by matrix name, and the
    number of input rows (tokens) each matrix saw. Expert matrices see only their routed tokens."""
    stats: dict = {}
    tokens: dict[str, int] = defaultdict(int)
    device = model_device(block.module)
    by_module = defaultdict(list)
    fused: dict[str, tuple[nn.Module, str]] = {}
    expert_matrix: dict[tuple[str, int], Matrix] = {}
    for m in block.matrices:
        if m.kind == "expert":
            fused[m.param_name] = (m.module, m.attr)
            expert_matrix[(m.param_name, m.expert)] = m
        else:
            by_module[id(m.module)].append(m)

    def add(m: Matrix, x: torch.Tensor):
        x = x.detach()
        if m.name not in stats:
            stats[m.name] = make_stat(m.in_features, device)
        stats[m.name].add(x.reshape(-1, x.shape[-1]) if m.kind == "expert" else x)
        tokens[m.name] += x.numel() // x.shape[-1]

    def hook(module, inp, _out):
        for m in by_module[id(module)]:
            add(m, inp[0])

    def on_expert(name, e, _transposed, x):
        m = expert_matrix.get((name, int(e)))
        if m is not None:
            add(m, x)

    handles = []
    seen = set()
    for m in block.matrices:
        if m.kind != "expert" and id(m.module) not in seen:
            seen.add(id(m.module))
            handles.append(m.module.register_forward_hook(hook))
    try:
        mode = _ExpertCalls(fused, on_expert) if fused else contextlib.nullcontext()
        with _eager_experts(model), mode:
            for inp in inputs:
                run_block(block, inp)
    finally:
        for h in handles:
            h.remove()
    return stats, dict(tokens)
