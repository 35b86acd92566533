"""Running under torchrun: process groups, DDP / FSDP2 wrapping, gradient sync, reductions.

The model knows nothing of this module. ``train`` asks it for the environment, wraps the bare
model with it, and uses its helpers to turn off gradient sync on all but the last micro-step, to
average values over ranks, and to gather full state dicts for rank 0 to save. With one process
every helper is the identity, so the single-device path runs the same code.

Checkpoints always hold the full, unsharded model and an optimizer state keyed by parameter index
(the order of ``model.parameters()``), whatever wrote them, so DDP, FSDP and single-device
checkpoints load into each other.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import importlib
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.utils.checkpoint

from gptforge.config import ConfigError
from gptforge.device import check_compile_locale, pick_device
from gptforge.errors import GptforgeError
from gptforge.launch import launched_by_torchrun


@dataclass
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    # Small host-side decisions (stop on a signal?) go over gloo on the CPU, so they never wait
    # for the GPU's queue to drain; None: the default group is gloo already.
    control_group: Any = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str, timeout_s: int) -> DistEnv:
    """Join the process group torchrun set up (NCCL on CUDA, gloo otherwise), or run alone.

    The timeout bounds every collective, so a rank that dies takes the others down with an
    error instead of leaving them waiting forever.
    """
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        device = pick_device(device_name)
        if device.type == "cuda":
            # cuda:1 alone: make it the current device, so the streams events are recorded on,
            # and kernels without an explicit device, are that GPU's
            torch.cuda.set_device(device)
        return DistEnv(device=device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    world = int(os.environ["WORLD_SIZE"])
    device = pick_device(device_name)
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible): "
                "use --nproc_per_node no larger than the number of GPUs"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    elif device.type == "mps":
        raise ConfigError("multi-process training on MPS is not supported: use one process")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s),
                                **({"device_id": device} if device.type == "cuda" else {}))
    control = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s)) if backend == "nccl" else None
    return DistEnv(rank=rank, local_rank=local_rank, world_size=world, device=device,
                   control_group=control)


def rank_seed(seed: int, rank: int) -> int:
    """A seed for what differs between ranks (dropout masks): distinct per rank, reproducible."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1, dtype=np.uint64)[0] >> 1)


def shutdown(env: DistEnv, clean: bool = True) -> None:
    """Leave the process group, so that it is torn down here and not at the interpreter's exit.
    After a clean run all ranks meet first: a rank that tears gloo down while a peer is still
    finishing its last collective can abort the peer ("terminate called without an active
    exception", seen in about 1 of 6 FSDP runs here). After an error there is no meeting: the
    other ranks may never arrive, and torchrun stops them.

    ``destroy_process_group`` only drops torch's own references to the group; the C++ group, with
    gloo's threads (``gloo_tcp_loop``, two ``pt_gloo_runloop``), goes when the last holder goes.
    A holder left to the interpreter's exit moves gloo's teardown into its finalization, where a
    rank aborted now and then after a finished run (issue 31). Two holders are released first:

    - DTensor's caches (FSDP2): sharding propagation, mesh topology and redistribution plans are
      memoized on keys that hold the DeviceMesh, whose ``_pg_registry`` holds the group. Without
      emptying them every FSDP rank kept gloo's three threads alive past the destroy, to its exit.
    - reference cycles: torch's lazy import of torch._dynamo, made under the first optimizer's
      construction, left a cycle through the frames then on the stack (the caller's, holding its
      model), which kept the DDP/FSDP model, a holder of the group, alive to the exit.
      gptforge.train imports torch._dynamo up front for that reason; bench, and any other such
      cycle, rely on this collection. The caller drops its own references first (train's Trainer).

    tests/test_distributed.py's probe checks that no gloo thread is left at exit, DDP and FSDP."""
    if env.distributed and dist.is_initialized():
        _clear_dtensor_caches()
        gc.collect()
        if clean:
            dist.barrier()
        dist.destroy_process_group()


# DTensor's caches whose keys or values hold a DeviceMesh (and so its process groups), as
# (module, attribute path to a function that empties the cache); private to torch, so looked up
# and skipped where absent. Found by following gc.get_referrers from the mesh after a gptforge
# FSDP run (torch 2.13).
_DTENSOR_CACHES = (
    ("torch.distributed.tensor.debug", "_clear_sharding_prop_cache"),  # Python and C++ fast path
    ("torch.distributed.tensor._collective_utils", "MeshTopoInfo.build_from_mesh.cache_clear"),
    ("torch.distributed.tensor._redistribute", "clear_redistribute_planner_cache"),
    ("torch.distributed.tensor._redistribute", "_gen_transform_infos.cache_clear"),
    ("torch.distributed._tensor.debug", "_clear_sharding_prop_cache"),  # torch < 2.5's name
)


def _clear_dtensor_caches() -> None:
    """Empty DTensor's caches that hold a DeviceMesh (see shutdown), where DTensor is in use."""
    emptied: set[str] = set()
    for module_name, path in _DTENSOR_CACHES:
        if path in emptied or module_name.rsplit(".", 1)[0] not in sys.modules:
            continue  # emptied under torch's current name, or DTensor never imported (plain DDP)
        try:
            target: Any = importlib.import_module(module_name)
            for name in path.split("."):
                target = getattr(target, name)
        except (ImportError, AttributeError):
            continue
        target()
        emptied.add(path)


@contextlib.contextmanager
def session(device_name: str, timeout_s: int) -> Iterator[DistEnv]:
    """The process group for the duration (see init_distributed), left cleanly at the end; after
    an error without the final meeting (see shutdown), so a failing rank never waits for peers
    that will not come."""
    env = init_distributed(device_name, timeout_s)
    try:
        yield env
    except BaseException:
        shutdown(env, clean=False)
        raise
    shutdown(env)


class PeerLost(GptforgeError):
    """A collective failed because another process of the job is gone (killed, or its machine)."""


def peer_lost(e: BaseException, env: DistEnv) -> GptforgeError | None:
    """A collective that failed because another process of the job died or hung, as one line
    (the launcher names the process and how to continue); None for any other error, which keeps
    its traceback."""
    if not env.distributed or not isinstance(e, RuntimeError):
        return None
    text = " ".join(str(e).split())
    backend = tuple(t for t in (getattr(dist, "DistBackendError", None),) if t is not None)
    if not (isinstance(e, backend) or any(s in text for s in ("gloo", "NCCL", "Connection closed by peer",
                                                                "Connection reset by peer"))):
        return None
    return PeerLost(f"rank {env.rank} stops: another process of the job is gone ({text[:160]})")


def _fsdp2():
    try:
        from torch.distributed.fsdp import (  # torch >= 2.6
            MixedPrecisionPolicy,
            fully_shard,
        )
    except ImportError:  # pragma: no cover - torch 2.4 / 2.5
        from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard
    return fully_shard, MixedPrecisionPolicy


def _checkpointed(forward: Callable[..., torch.Tensor], x: torch.Tensor,
                  kv_cache: Any = None) -> torch.Tensor:
    """A block's forward that keeps only its input for the backward pass and runs the block again
    there. Non-reentrant, with the RNG state saved and restored around the recomputation, so the
    dropout masks and hence the gradients are the ones a plain backward gives. Generation (a KV
    cache) and anything under no_grad run the plain forward: there is nothing to save."""
    if kv_cache is None and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(forward, x, use_reentrant=False,
                                                 preserve_rng_state=True)
    return forward(x, kv_cache)


def checkpoint_blocks(model: nn.Module) -> None:
    """Per-block activation checkpointing, in place: each block's ``forward`` becomes
    ``_checkpointed`` around its own. Memory for activations drops from every block's
    intermediates to one tensor per block (plus one block's at a time in the backward), for
    about one more forward pass of compute.

    Why the instance's ``forward`` and not torch's ``checkpoint_wrapper``: the wrapper is a module
    around the block, which renames every parameter (``..._checkpoint_wrapped_module.``) in state
    dicts, optimizer state and checkpoints; here names, module types and checkpoints stay GPT-2's.
    torch.compile traces ``torch.utils.checkpoint`` inside a compiled region as one higher-order
    op, so the recomputation is compiled too; FSDP2's hooks run around the block's call as before.
    """
    for block in model.transformer.h:
        if isinstance(block.__dict__.get("forward"), functools.partial):
            continue  # already checkpointed
        block.forward = functools.partial(_checkpointed, block.forward)


def wrap_model(model: nn.Module, env: DistEnv, parallel: str, compile: bool = False,
               amp_dtype: torch.dtype | None = None, bucket_mb: int = 25,
               activation_checkpointing: bool = False) -> nn.Module:
    """The module training steps run through: compiled and/or wrapped in DDP or FSDP2.

    DDP: gradients live in the all-reduce buckets themselves (``gradient_as_bucket_view``: no
    copy in or out of them), ``bucket_mb`` per bucket; compiled around the wrapper, so its hooks
    overlap the all-reduce with the backward pass. FSDP2: each block is compiled, then sharded,
    then the root; with bf16 autocast the parameters are gathered in bf16 (half the traffic) and
    gradients reduced in fp32. FSDP2 shards in place, so ``model`` itself then holds DTensor
    parameters. Evaluation and checkpoints use ``model``, never the compiled module, so no
    ``_orig_mod.`` names are saved.

    ``activation_checkpointing``: every block checkpointed first (``checkpoint_blocks``), so that
    the recomputation sits inside whatever is compiled. Compiled DDP then compiles each block in
    place instead of the wrapper: dynamo's DDPOptimizer, which splits a compiled DDP graph at
    bucket boundaries, refuses graphs that hold checkpoint's higher-order op in older torch
    versions (pytorch#104674); DDP's own hooks overlap the all-reduce as they do uncompiled.
    """
    if compile:
        check_compile_locale()
    if activation_checkpointing:
        checkpoint_blocks(model)
    if not env.distributed:
        return torch.compile(model) if compile else model
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        if compile and activation_checkpointing:
            for block in model.transformer.h:
                block.compile()
        ddp = DDP(model, device_ids=[env.local_rank] if env.device.type == "cuda" else None,
                  gradient_as_bucket_view=True, bucket_cap_mb=bucket_mb)
        return torch.compile(ddp) if compile and not activation_checkpointing else ddp
    fully_shard, MixedPrecisionPolicy = _fsdp2()
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if amp_dtype == torch.bfloat16 else MixedPrecisionPolicy())
    for block in model.transformer.h:
        if compile:
            block.compile()  # in place, before sharding: FSDP's hooks stay outside the graph
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)  # the root holds wte/lm_head (tied), wpe and ln_f
    return model


def grad_sync(wrapped: nn.Module, env: DistEnv, parallel: str, enabled: bool) -> contextlib.AbstractContextManager:
    """Skip the gradient all-reduce on micro-steps that are not the last of a step."""
    if not env.distributed:
        return contextlib.nullcontext()
    if parallel == "ddp":
        return contextlib.nullcontext() if enabled else wrapped.no_sync()
    wrapped.set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()


def mean_over_ranks(value: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.distributed:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.AVG if env.device.type == "cuda" else dist.ReduceOp.SUM)
        if env.device.type != "cuda":  # gloo has no AVG
            value /= env.world_size
    return value


def sum_over_ranks(value: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.distributed:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def any_rank(flag: bool, env: DistEnv) -> bool:
    """True on every rank if it is true on any: all ranks must agree to stop at the same step.
    A CPU tensor over the gloo control group: asking costs no wait for the GPU."""
    if not env.distributed:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=env.control_group)
    return bool(t.item() > 0)


def min_over_ranks(value: int, env: DistEnv) -> int:
    """The smallest of every rank's ``value`` (over the gloo control group: no GPU wait)."""
    if not env.distributed:
        return value
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=env.control_group)
    return int(t.item())


def gather_objects(obj: Any, env: DistEnv) -> list[Any]:
    if not env.distributed:
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a tensor or a replicated DTensor (FSDP's gradient norm), on its device."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


# ----------------------------------------------------------------------------------------------
# Full state dicts (collective under FSDP: every rank must call these)


def _full_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def unwrap(wrapped: nn.Module) -> nn.Module:
    """The bare model under DDP's ``module`` and torch.compile's ``_orig_mod``."""
    while True:
        if hasattr(wrapped, "module") and isinstance(wrapped.module, nn.Module):
            wrapped = wrapped.module
        elif hasattr(wrapped, "_orig_mod"):
            wrapped = wrapped._orig_mod
        else:
            return wrapped


def full_model_state(model: nn.Module, env: DistEnv, parallel: str) -> dict[str, torch.Tensor]:
    """Unsharded weights with GPT-2 names (meaningful on rank 0)."""
    if env.distributed and parallel == "fsdp":
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(model, options=_full_options())
    return unwrap(model).state_dict()


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, env: DistEnv,
                         parallel: str) -> dict[str, Any]:
    """The optimizer state as ``optimizer.state_dict()`` would give it on one device: keyed by
    parameter index, full tensors (meaningful on rank 0)."""
    if not (env.distributed and parallel == "fsdp"):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    by_name = get_optimizer_state_dict(model, optimizer, options=_full_options())
    if not by_name:  # ranks other than 0 get nothing back with cpu_offload
        return {}
    index: dict[str, int] = {}
    groups = []
    for group in by_name["param_groups"]:
        ids = []
        for name in group["params"]:
            index[name] = len(index)
            ids.append(index[name])
        groups.append({**group, "params": ids})
    state = {index[name]: s for name, s in by_name["state"].items()}
    return {"state": state, "param_groups": groups}


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer,
                         state: dict[str, Any], env: DistEnv, parallel: str) -> None:
    """Load a full, index-keyed optimizer state (from any checkpoint) into a possibly sharded one."""
    if not (env.distributed and parallel == "fsdp"):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    # Our optimizer's groups list parameters in the order param_groups() put them; map each
    # back to its name (named_parameters yields the tied matrix once).
    order = {id(p): n for n, p in unwrap(model).named_parameters()}
    group_names = [[order[id(p)] for p in g["params"]] for g in optimizer.param_groups]
    flat = [n for g in group_names for n in g]
    assert sorted(flat) == sorted(order.values()), "optimizer and model parameters differ"
    by_name = {
        "state": {flat[int(i)]: s for i, s in state["state"].items()},
        "param_groups": [{**g, "params": group_names[k]} for k, g in enumerate(state["param_groups"])],
    }
    set_optimizer_state_dict(model, optimizer, optim_state_dict=by_name, options=_full_options())
