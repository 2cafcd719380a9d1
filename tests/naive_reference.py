"""The naive Wanda oracle of SPEC §7 ("Test method"): slow, obviously right, no block walk.

``naive_wanda_(model, batches, sparsity, block_paths)`` prunes ``model`` in place. For each block
list in forward order and each block in it, it runs the WHOLE model (``model(**batch,
use_cache=False)``) on every calibration batch, the earlier blocks already pruned, with hooks that
sum x**2 per input column for every prunable matrix of that block, then prunes each of those
matrices with Wanda's per-row rule (``ecoflap_fast.reference.wanda_prune_``). Nothing is replayed or
cached between blocks: each block sees exactly the inputs (hidden states, masks, rotary tables,
encoder outputs) the model itself gives it.

Prunable matrices of a block (every other parameter with dim >= 2 stays dense and is reported):

- ``nn.Linear`` weights ``[out, in]``: statistic over the layer's input ``[..., in]``;
- ``transformers.pytorch_utils.Conv1D`` weights ``[in, out]`` (GPT-2): the mask is computed on the
  transpose ``[out, in]`` with the statistic of the layer's input;
- fused MoE experts (``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``; the classes listed in
  ``FUSED_EXPERTS``): each expert slice is its own matrix. The routing is read from the experts
  module's own inputs ``(hidden_states, top_k_index, top_k_weights)`` (a forward pre-hook), and the
  per-expert inputs are recomputed here with the classes' eager math: ``x_e = hidden[tokens with e
  in top_k_index]`` for ``gate_up_proj[e]``, ``act_fn(gate) * up`` with ``gate, up = (x_e @
  gate_up_proj[e].T).chunk(2)`` for ``down_proj[e]``. An expert that no token reached is pruned by
  magnitude (the same rule with a statistic of ones) and listed in ``magnitude_pruned``.

Routers stay dense: the ``gate`` of an MoE block (a ``*TopKRouter`` module with a ``[E, H]``
weight, or a Linear whose ``out_features`` is E) and Qwen2-MoE's ``shared_expert_gate`` (a Linear to
1 output). So do embeddings inside blocks (T5's relative position bias) and anything else that is
not one of the three kinds above.

The statistic is the plain sum of x**2 over every calibration position the layer sees (padded
positions of encoder batches included: the layer computes on them too), accumulated in fp64 and
divided by the number of positions; Wanda's rule is invariant to that positive constant.
"""

from __future__ import annotations

import inspect
import re

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ecoflap_fast import reference

# The fused-experts classes whose forward this file restates (gate_up_proj concatenated [gate; up],
# not transposed, no bias): read modeling_<name>.py before adding one.
FUSED_EXPERTS = {"MixtralExperts", "Qwen2MoeExperts", "Qwen3MoeExperts", "DeepseekV3Experts"}


def _forward(model: nn.Module, batch: dict):
    kwargs = dict(batch)
    params = inspect.signature(model.forward).parameters
    if "use_cache" in params:
        kwargs["use_cache"] = False
    return model(**kwargs)


def _is_experts(mod: nn.Module) -> bool:
    p = getattr(mod, "gate_up_proj", None)
    return isinstance(p, nn.Parameter) and p.dim() == 3


class _ColumnStat:
    """sum of x**2 per input column in fp64, and the number of rows (positions) seen."""

    def __init__(self, width: int):
        self.sum = torch.zeros(width, dtype=torch.float64)
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
        self.sum += x.pow(2).sum(dim=0).cpu()
        self.rows += x.shape[0]

    def scaler(self) -> torch.Tensor:
        return (self.sum / max(self.rows, 1)).float()


def _block_layout(block: nn.Module, prefix: str):
    """Split the block's dim >= 2 parameters into prunable targets and dense ones (with reasons).

    Returns (linears, conv1ds, experts, dense): ``linears``/``conv1ds``: {param name: module};
    ``experts``: {experts module name: module}; ``dense``: [(param name, reason)].
    """
    linears, conv1ds, experts, routers = {}, {}, {}, {}
    for mname, mod in block.named_modules():
        full = f"{prefix}.{mname}" if mname else prefix
        if _is_experts(mod):
            cls = type(mod).__name__
            if cls not in FUSED_EXPERTS:
                raise NotImplementedError(f"{full}: fused experts class {cls} is not restated in naive_reference")
            if getattr(mod, "is_transposed", False) or getattr(mod, "has_bias", False):
                raise NotImplementedError(f"{full}: transposed or biased experts are not restated")
            experts[full] = mod
            n_exp = mod.gate_up_proj.shape[0]
            # the MoE block is the experts module's parent: its direct Linear / router children route
            parent_name = mname.rsplit(".", 1)[0] if "." in mname else ""
            parent = block.get_submodule(parent_name) if parent_name else block
            for cname, child in parent.named_children():
                cfull = f"{prefix}.{parent_name}.{cname}" if parent_name else f"{prefix}.{cname}"
                if child is mod:
                    continue
                if isinstance(child, nn.Linear) and child.out_features in (1, n_exp):
                    kind = "shared-expert gate" if child.out_features == 1 else "Linear gate"
                    routers[cfull] = f"router ({kind})"
                elif not isinstance(child, nn.Linear) and any(
                    p.dim() == 2 and p.shape[0] == n_exp for p in child.parameters(recurse=False)
                ):
                    routers[cfull] = f"router ({type(child).__name__})"
    for mname, mod in block.named_modules():
        full = f"{prefix}.{mname}" if mname else prefix
        if full in routers:
            continue
        if isinstance(mod, nn.Linear):
            linears[f"{full}.weight"] = mod
        elif isinstance(mod, Conv1D):
            conv1ds[f"{full}.weight"] = mod
    handled = set(linears) | set(conv1ds)
    handled |= {f"{e}.{p}" for e in experts for p in ("gate_up_proj", "down_proj")}
    dense = []
    for pname, p in block.named_parameters():
        full = f"{prefix}.{pname}"
        if p.dim() < 2 or full in handled:
            continue
        owner_name = pname.rsplit(".", 1)[0] if "." in pname else ""
        owner = block.get_submodule(owner_name) if owner_name else block
        if f"{prefix}.{owner_name}" in routers:
            reason = routers[f"{prefix}.{owner_name}"]
        elif isinstance(owner, nn.Embedding):
            reason = "embedding inside the block (e.g. T5 relative position bias)"
        elif p.dim() == 3:
            raise NotImplementedError(f"{full}: a 3-D parameter of shape {tuple(p.shape)} that is not fused experts")
        else:
            reason = f"{type(owner).__name__} weight: not a Linear, Conv1D or fused-experts matrix"
        dense.append((full, reason))
    return linears, conv1ds, experts, dense


def expert_inputs(experts: nn.Module, args: tuple, kwargs: dict) -> dict:
    """{e: (token rows, x_e, h_e)} for a fused-experts module called as ``experts(hidden_states,
    top_k_index, top_k_weights)``: the rows of ``hidden_states [N, H]`` routed to expert e, the input
    ``x_e`` of ``gate_up_proj[e]`` and the input ``h_e = act_fn(gate) * up`` of ``down_proj[e]``, as the
    eager forward of the ``FUSED_EXPERTS`` classes computes them (``gate_up_proj`` is [gate; up])."""
    named = dict(zip(("hidden_states", "top_k_index", "top_k_weights"), args))
    named.update(kwargs)
    hidden_states, top_k_index = named["hidden_states"], named["top_k_index"]
    x = hidden_states.reshape(-1, hidden_states.shape[-1])
    idx = top_k_index.reshape(x.shape[0], -1)
    out = {}
    for e in range(experts.gate_up_proj.shape[0]):
        rows = (idx == e).any(dim=-1).nonzero().flatten()
        x_e = x[rows]
        gate, up = nn.functional.linear(x_e, experts.gate_up_proj[e]).chunk(2, dim=-1)
        out[e] = (rows, x_e, experts.act_fn(gate) * up)
    return out


@torch.no_grad()
def naive_wanda_(model: nn.Module, batches: list[dict], sparsity: float, block_paths: list[str]) -> dict:
    """Prune ``model`` in place, block by block with whole-model forwards; see the module docstring.

    ``batches``: model-input dicts; ``block_paths``: attribute paths of the block lists in forward
    order. Returns ``{"pruned": {name or name[e]: achieved sparsity}, "expert_tokens": {name[e]:
    tokens routed}, "dense_in_blocks": [(name, reason)], "magnitude_pruned": [name[e]]}``.
    """
    model.eval()
    result = {"pruned": {}, "expert_tokens": {}, "dense_in_blocks": [], "magnitude_pruned": []}
    for path in block_paths:
        blocks = model.get_submodule(path)
        for i, block in enumerate(blocks):
            prefix = f"{path}.{i}"
            linears, conv1ds, experts, dense = _block_layout(block, prefix)
            result["dense_in_blocks"].extend(dense)
            stats: dict[str, _ColumnStat] = {}
            calls: dict[str, int] = {}
            handles = []

            def column_hook(name, width):
                stats[name] = _ColumnStat(width)
                calls[name] = 0

                def fn(_mod, args, kwargs):
                    x = args[0] if args else next(iter(kwargs.values()))
                    stats[name].add(x)
                    calls[name] += 1

                return fn

            for name, lin in linears.items():
                handles.append(lin.register_forward_pre_hook(column_hook(name, lin.in_features), with_kwargs=True))
            for name, conv in conv1ds.items():  # Conv1D weight is [in, out]
                hook = column_hook(name, conv.weight.shape[0])
                handles.append(conv.register_forward_pre_hook(hook, with_kwargs=True))

            def experts_hook(ename, mod):
                n_exp, two_i, hidden = mod.gate_up_proj.shape
                inter = mod.down_proj.shape[2]
                assert two_i == 2 * inter, (ename, tuple(mod.gate_up_proj.shape), tuple(mod.down_proj.shape))
                for e in range(n_exp):
                    stats[f"{ename}.gate_up_proj[{e}]"] = _ColumnStat(hidden)
                    stats[f"{ename}.down_proj[{e}]"] = _ColumnStat(inter)
                calls[ename] = 0

                def fn(m, args, kwargs):
                    for e, (_, x_e, h_e) in expert_inputs(m, args, kwargs).items():
                        stats[f"{ename}.gate_up_proj[{e}]"].add(x_e)
                        stats[f"{ename}.down_proj[{e}]"].add(h_e)
                    calls[ename] += 1

                return fn

            for ename, mod in experts.items():
                handles.append(mod.register_forward_pre_hook(experts_hook(ename, mod), with_kwargs=True))
            try:
                for batch in batches:
                    _forward(model, batch)
            finally:
                for h in handles:
                    h.remove()
            silent = [n for n, c in calls.items() if c == 0]
            if silent:
                raise RuntimeError(f"{prefix}: no input reached {silent} (a layer used without calling it?)")

            for name, lin in {**linears, **conv1ds}.items():
                w = lin.weight.data
                w2d = w.t() if name in conv1ds else w  # Conv1D stores [in, out]: prune the transpose's rows
                reference.wanda_prune_(w2d, stats[name].scaler(), sparsity)
                result["pruned"][name] = float((w == 0).float().mean())
            for ename, mod in experts.items():
                for pname in ("gate_up_proj", "down_proj"):
                    param = getattr(mod, pname).data
                    for e in range(param.shape[0]):
                        key = f"{ename}.{pname}[{e}]"
                        st = stats[key]
                        result["expert_tokens"][key] = st.rows
                        if st.rows == 0:
                            scaler = torch.ones(param.shape[2])
                            result["magnitude_pruned"].append(key)
                        else:
                            scaler = st.scaler()
                        reference.wanda_prune_(param[e], scaler, sparsity)
                        result["pruned"][key] = float((param[e] == 0).float().mean())
    return result


def prunable_names(model: nn.Module, block_paths: list[str]) -> list[str]:
    """The names ``naive_wanda_`` prunes (``name`` or ``name[e]`` per expert slice), without pruning."""
    names = []
    for path in block_paths:
        for i, block in enumerate(model.get_submodule(path)):
            linears, conv1ds, experts, _ = _block_layout(block, f"{path}.{i}")
            names += list(linears) + list(conv1ds)
            for ename, mod in experts.items():
                for pname in ("gate_up_proj", "down_proj"):
                    names += [f"{ename}.{pname}[{e}]" for e in range(getattr(mod, pname).shape[0])]
    return names


_SLICE = re.compile(r"^(.*)\[(\d+)\]$")


def _param(model: nn.Module, name: str) -> torch.Tensor:
    """The tensor a name refers to: ``a.b.weight`` or an expert slice ``a.experts.down_proj[3]``."""
    m = _SLICE.match(name)
    if m:
        return model.get_parameter(m.group(1)).data[int(m.group(2))]
    return model.get_parameter(name).data


def mask_agreement(model_a: nn.Module, model_b: nn.Module, names) -> dict[str, float]:
    """{name: fraction of positions where ``W == 0`` agrees between the two models}.

    ``names``: parameter names or expert slices ``name[e]``; a 3-D parameter given by its plain name
    is compared per expert slice (``name[0]``, ``name[1]``, ...).
    """
    out = {}
    for name in names:
        if not _SLICE.match(name) and model_a.get_parameter(name).dim() == 3:
            keys = [f"{name}[{e}]" for e in range(model_a.get_parameter(name).shape[0])]
        else:
            keys = [name]
        for key in keys:
            a, b = _param(model_a, key), _param(model_b, key)
            assert a.shape == b.shape, (key, tuple(a.shape), tuple(b.shape))
            out[key] = float(((a == 0) == (b == 0)).float().mean())
    return out


def block_zero_fraction(model: nn.Module, block_paths) -> float:
    """Zeros over every parameter with dim >= 2 inside the block lists (experts, routers and any
    dense matrices included)."""
    zeros = total = 0
    for path in block_paths:
        for p in model.get_submodule(path).parameters():
            if p.dim() >= 2:
                zeros += int((p == 0).sum())
                total += p.numel()
    return zeros / total


def param_name(matrix_name: str) -> str:
    """The parameter behind an engine matrix name: module names (Linear, Conv1D) get '.weight';
    '<parameter>[e]' (expert e of a fused expert parameter) stays as it is."""
    return matrix_name if matrix_name.endswith("]") else f"{matrix_name}.weight"
