"""Tests of jaxlora.checkpoint: round trips, retention, async saves, exact resume, refusals.

The kill test and the mesh test run helper scripts (``tests/_ckpt_*.py``) in their own
processes: one is killed mid-save, the other needs 8 fake CPU devices, which only a flag
set before JAX starts can provide.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import _ckpt_kill
import _ckpt_mesh
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jl_testing import randomize

import jaxlora as jl
from jaxlora.checkpoint import CheckpointError, CheckpointManager, array_bytes, checkpoint_bytes

HERE = Path(__file__).parent

PARAMS = {
    "l1": {"kernel": jax.random.normal(jax.random.key(1), (8, 16)) * 0.3},
    "l2": {"kernel": jax.random.normal(jax.random.key(2), (16, 8)) * 0.3},
}

SPECS = {
    "lora": dict(rank=2, alpha=4.0, targets=".*kernel"),
    "vera": dict(rank=4, targets=".*kernel"),
    "delta_lora": dict(rank=2, alpha=4.0, targets=".*kernel", lam=0.5, start_step=1),
}


def loss_fn(params, batch):
    h = jnp.tanh(batch["x"] @ params["l1"]["kernel"])
    return jnp.mean((h @ params["l2"]["kernel"] - batch["y"]) ** 2)


def make_batch(data_position, rng):
    # The stream position picks the examples, the run's RNG adds noise: a resumed run
    # reproduces the uninterrupted one only if both are restored exactly.
    k = jax.random.fold_in(jax.random.key(99), data_position)
    x = jax.random.normal(k, (4, 8))
    y = jnp.sin(x) + 0.01 * jax.random.normal(rng, (4, 8))
    return {"x": x, "y": y}


def assert_trees_equal(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(la, lb, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def train(spec, tx, step_fn, params, adapters, opt_state, rng, position, steps):
    for _ in range(steps):
        rng, sub = jax.random.split(rng)
        params, adapters, opt_state, _ = step_fn(
            params, adapters, opt_state, make_batch(position, sub)
        )
        position += 4
    return params, adapters, opt_state, rng, position


@pytest.mark.parametrize("name", sorted(SPECS))
def test_exact_resume(tmp_path, name):
    spec = jl.recipe(name, **SPECS[name])
    tx = spec.optimizer(optax.adamw, learning_rate=0.05)
    step_fn = jl.train_step(loss_fn, tx)

    def key():
        # a new key each time: VeRA's init keeps the key's buffer, which the step donates
        return jax.random.key(0)

    def fresh():
        params, adapters = spec.prepare(key(), PARAMS)
        params = jax.tree_util.tree_map(jnp.copy, params)  # the step donates the base
        return params, adapters, tx.init(adapters)

    n, k = 6, 3
    p, a, s = fresh()
    full = train(spec, tx, step_fn, p, a, s, jax.random.key(7), 0, n)

    p, a, s = fresh()
    p, a, s, rng, pos = train(spec, tx, step_fn, p, a, s, jax.random.key(7), 0, k)
    moves_base = spec.moves_base
    with CheckpointManager(tmp_path, method=spec.method, store_base=moves_base) as mgr:
        mgr.save(k, adapters=a, opt_state=s, rng=rng, data_position=pos, base=p)
    del p, a, s, rng

    # a new process would start from here: the base as loaded, abstract targets
    base = jax.tree_util.tree_map(jnp.copy, spec.prepare(key(), PARAMS)[0])
    target = jax.eval_shape(spec.init, key(), PARAMS)
    opt_target = jax.eval_shape(tx.init, target)
    with CheckpointManager(tmp_path, method=spec.method) as mgr:
        st = mgr.restore(adapters=target, opt_state=opt_target, base=base)
    assert st.step == k and st.data_position == 4 * k
    resumed = train(
        spec, tx, step_fn, st.base, st.adapters, st.opt_state, st.rng, st.data_position, n - k
    )

    assert_trees_equal(resumed[1], full[1])  # adapters
    assert_trees_equal(resumed[2], full[2])  # optimizer state
    assert_trees_equal(resumed[0], full[0])  # base (moved by Delta-LoRA)
    assert resumed[4] == full[4]
    assert bool(jnp.all(jax.random.key_data(resumed[3]) == jax.random.key_data(full[3])))
    if moves_base:
        moved = np.asarray(full[0]["l1"]["kernel"])
        assert not np.array_equal(moved, np.asarray(PARAMS["l1"]["kernel"]))


METHODS = {
    "lora": jl.lora(rank=2, targets=".*kernel"),
    "lora_fa": jl.lora_fa(rank=2, targets=".*kernel"),
    "dora": jl.dora(rank=2, targets=".*kernel"),
    "vera": jl.vera(rank=4, targets=".*kernel"),
    "lora+full": jl.compose(jl.lora(rank=2, targets="l1/kernel"), jl.full(targets="l2/.*")),
}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_round_trip_every_method(tmp_path, name):
    method = METHODS[name]
    adapters = method.init(jax.random.key(0), PARAMS)
    tx = jl.optimizer(optax.adam(1e-3))
    state = tx.init(adapters)
    raw_key = jax.random.PRNGKey(5)  # a legacy uint32 key round-trips as one
    with CheckpointManager(tmp_path, async_save=False) as mgr:
        mgr.save(1, adapters=adapters, opt_state=state, rng=raw_key, data_position=12)
        target = jax.eval_shape(method.init, jax.random.key(0), PARAMS)
        st = mgr.restore(adapters=target, opt_state=jax.eval_shape(tx.init, target))
    assert_trees_equal(st.adapters, adapters)
    assert_trees_equal(st.opt_state, state)
    np.testing.assert_array_equal(st.rng, raw_key)
    assert st.data_position == 12 and st.base is None


def test_vera_stores_the_key_not_the_matrices(tmp_path):
    params = {"q": {"kernel": jnp.zeros((64, 64))}, "o": {"kernel": jnp.zeros((64, 32))}}
    adapters = jl.vera(rank=32, targets=".*kernel").init(jax.random.key(0), params)
    with CheckpointManager(tmp_path, async_save=False) as mgr:
        mgr.save(0, adapters=adapters)
        assert mgr.metadata(0)["shared_storage"] == {"vera": "compact"}
    vectors = array_bytes({k: v for k, v in adapters.items() if k != "__shared__"})
    matrices = array_bytes(adapters["__shared__"])
    size = checkpoint_bytes(tmp_path / "0" / "adapters")
    assert size < vectors + matrices / 4


def test_vera_matrices_that_the_key_does_not_regenerate_are_stored(tmp_path):
    method = jl.vera(rank=4, targets=".*kernel")
    adapters = method.init(jax.random.key(0), PARAMS)
    sh = adapters["__shared__"]["vera"]
    import dataclasses

    adapters["__shared__"]["vera"] = dataclasses.replace(sh, a=sh.a + 1.0)
    with CheckpointManager(tmp_path, async_save=False) as mgr:
        mgr.save(0, adapters=adapters)
        assert mgr.metadata(0)["shared_storage"] == {"vera": "full"}
        st = mgr.restore(adapters=jax.eval_shape(method.init, jax.random.key(0), PARAMS))
    assert_trees_equal(st.adapters, adapters)


def test_keep_last_n(tmp_path):
    adapters = METHODS["lora"].init(jax.random.key(0), PARAMS)
    with CheckpointManager(tmp_path, max_to_keep=2) as mgr:
        for step in range(5):
            mgr.save(step, adapters=adapters)
        mgr.wait()
        assert mgr.all_steps() == [3, 4]
        assert mgr.latest_step() == 4


@pytest.mark.parametrize("mode", ["min", "max"])
def test_keep_best_by_metric(tmp_path, mode):
    adapters = METHODS["lora"].init(jax.random.key(0), PARAMS)
    losses = [5.0, 1.0, 4.0, 3.0, 6.0]
    with CheckpointManager(tmp_path, max_to_keep=1, best_metric="loss", best_mode=mode) as mgr:
        for step, loss in enumerate(losses):
            mgr.save(step, adapters=adapters, metrics={"loss": jnp.float32(loss)})
        mgr.wait()
        best = 1 if mode == "min" else 4
        assert mgr.all_steps() == sorted({best, 4})
        assert mgr.best_step() == best
        with pytest.raises(CheckpointError, match="metrics="):
            mgr.save(9, adapters=adapters)


def test_async_save_survives_donation(tmp_path):
    method = METHODS["lora"]
    adapters = jl_random(method)
    expect = jax.tree_util.tree_map(np.asarray, adapters)
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(3, adapters=adapters)
        for x in jax.tree_util.tree_leaves(adapters):
            x.delete()  # what donating them to the next train step does
        mgr.wait()
        st = mgr.restore(adapters=jax.eval_shape(method.init, jax.random.key(0), PARAMS))
    assert_trees_equal(jax.tree_util.tree_map(np.asarray, st.adapters), expect)


def jl_random(method, seed=0):
    return randomize(method.init(jax.random.key(seed), PARAMS), jax.random.key(seed + 1))


# ----------------------------------------------------------------------------- refusals


def _saved(tmp_path, method=METHODS["lora"], tx=None):
    adapters = jl_random(method)
    tx = tx or jl.optimizer(optax.adam(1e-3))
    with CheckpointManager(tmp_path, async_save=False) as mgr:
        mgr.save(1, adapters=adapters, opt_state=tx.init(adapters), data_position=7)
    return adapters


@pytest.mark.parametrize(
    ("target", "message"),
    [
        (jl.dora(rank=2, targets=".*kernel"), "DoraAdapter"),
        (jl.lora(rank=1, targets=".*kernel"), "rank is 2 in the checkpoint but 1"),
        (jl.lora(rank=2, alpha=16.0, targets=".*kernel"), "scale"),
        (jl.lora(rank=2, targets="l1/kernel"), "target sets differ"),
        (jl.vera(rank=2, targets=".*kernel"), "VeraAdapter"),
    ],
)
def test_refuses_another_method_rank_or_targets(tmp_path, target, message):
    _saved(tmp_path)
    with CheckpointManager(tmp_path) as mgr, pytest.raises(CheckpointError, match=message):
        mgr.restore(adapters=jax.eval_shape(target.init, jax.random.key(0), PARAMS))


def test_refuses_another_optimizer_and_method_name(tmp_path):
    method = METHODS["lora"]
    _saved(tmp_path)
    target = jax.eval_shape(method.init, jax.random.key(0), PARAMS)
    other = jax.eval_shape(jl.optimizer(optax.sgd(0.1, momentum=0.9)).init, target)
    with CheckpointManager(tmp_path) as mgr, pytest.raises(CheckpointError, match="optimizer"):
        mgr.restore(adapters=target, opt_state=other)
    with CheckpointManager(tmp_path, method="lora") as mgr:
        mgr.restore(adapters=target)  # no method recorded: nothing to compare
    with CheckpointManager(tmp_path / "named", method="dora") as mgr:
        mgr.save(1, adapters=jl_random(method))
    with (
        CheckpointManager(tmp_path / "named", method="lora") as mgr,
        pytest.raises(CheckpointError, match="written by method 'dora'"),
    ):
        mgr.restore(adapters=target)


# A failed orbax read can leave a coroutine that is only collected after its event loop
# closed; Python then reports "Event loop is closed" as unraisable. Collect it here.
_ORBAX_LEFTOVERS = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@_ORBAX_LEFTOVERS
def test_refuses_a_truncated_file(tmp_path):
    method = METHODS["lora"]
    _saved(tmp_path)
    files = [f for f in (tmp_path / "1" / "adapters").rglob("*") if f.is_file() and "/d/" in str(f)]
    assert files
    for f in files:
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    target = jax.eval_shape(method.init, jax.random.key(0), PARAMS)
    with CheckpointManager(tmp_path) as mgr, pytest.raises(CheckpointError, match="corrupt"):
        mgr.restore(adapters=target)
    gc.collect()


@_ORBAX_LEFTOVERS
def test_refuses_corrupt_metadata(tmp_path):
    method = METHODS["lora"]
    _saved(tmp_path)
    (tmp_path / "1" / "meta" / "metadata").write_text('{"format": 1, "ste')
    target = jax.eval_shape(method.init, jax.random.key(0), PARAMS)
    with CheckpointManager(tmp_path) as mgr, pytest.raises(CheckpointError, match="corrupt"):
        mgr.restore(adapters=target)
    gc.collect()


def test_refuses_a_newer_format_and_missing_steps(tmp_path):
    method = METHODS["lora"]
    _saved(tmp_path)
    file = tmp_path / "1" / "meta" / "metadata"
    meta = json.loads(file.read_text())
    file.write_text(json.dumps({**meta, "format": 99}))
    target = jax.eval_shape(method.init, jax.random.key(0), PARAMS)
    with CheckpointManager(tmp_path) as mgr:
        with pytest.raises(CheckpointError, match="newer"):
            mgr.restore(adapters=target)
        with pytest.raises(CheckpointError, match="no complete checkpoint for step 5"):
            mgr.restore(5, adapters=target)
    with (
        CheckpointManager(tmp_path / "empty") as mgr,
        pytest.raises(CheckpointError, match="no complete checkpoint"),
    ):
        mgr.restore(adapters=target)


def test_never_overwrites_a_step(tmp_path):
    adapters = _saved(tmp_path)
    before = checkpoint_bytes(tmp_path / "1")
    with CheckpointManager(tmp_path) as mgr, pytest.raises(CheckpointError, match="already"):
        mgr.save(1, adapters=jax.tree_util.tree_map(jnp.zeros_like, adapters))
    assert checkpoint_bytes(tmp_path / "1") == before


def test_delta_lora_checkpoint_needs_the_base(tmp_path):
    method = METHODS["lora"]
    adapters = jl_random(method)
    with CheckpointManager(tmp_path, async_save=False) as mgr:
        mgr.save(1, adapters=adapters, base=PARAMS)
        target = jax.eval_shape(method.init, jax.random.key(0), PARAMS)
        with pytest.raises(CheckpointError, match="base="):
            mgr.restore(adapters=target)


def test_adapter_only_size(tmp_path):
    # LoRA on a 256-wide model: the checkpoint is the adapter arrays plus a few KB
    params = {f"l{i}": {"kernel": jnp.zeros((256, 256))} for i in range(4)}
    adapters = jl.lora(rank=16, targets=".*kernel").init(jax.random.key(0), params)
    adapters = jax.tree_util.tree_map(
        lambda x: jax.random.normal(jax.random.key(1), x.shape), adapters
    )
    with CheckpointManager(tmp_path, async_save=False) as mgr:
        mgr.save(0, adapters=adapters)
    assert checkpoint_bytes(tmp_path / "0") <= 1.05 * jl.num_trainable(adapters) * 4


# ------------------------------------------------------------------------ subprocesses


def _run(script, *args, env=None, timeout=240):
    return subprocess.run(
        [sys.executable, str(HERE / script), *map(str, args)],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_kill_during_save_leaves_the_previous_step(tmp_path):
    ckpt = tmp_path / "ckpt"
    with (
        open(tmp_path / "stderr.txt", "w") as err,
        subprocess.Popen(
            [sys.executable, str(HERE / "_ckpt_kill.py"), str(ckpt)],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        ) as proc,
    ):
        try:
            # SAVING: step 1 is complete and step 2 (32 MB) is about to be written
            line = proc.stdout.readline()
            assert line.strip() == "SAVING", line + (tmp_path / "stderr.txt").read_text()
            deadline = time.monotonic() + 60
            while not any("tmp" in p.name for p in ckpt.iterdir()):
                assert time.monotonic() < deadline, "the second save never started writing"
                time.sleep(0.002)
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (ckpt / "2").exists()  # killed mid-write, not after the rename
    method, expect = _ckpt_kill.method_and_adapters(1)
    with CheckpointManager(ckpt) as mgr:
        assert mgr.all_steps() == [1]
        target = jax.eval_shape(method.init, jax.random.key(0), _ckpt_kill.params())
        st = mgr.restore(adapters=target)
    assert_trees_equal(st.adapters, expect)
    assert not any("tmp" in p.name for p in ckpt.iterdir())  # cleaned up on start


def test_restore_onto_another_mesh(tmp_path):
    # 1 device -> 8 devices (fsdp): the child checks values and shardings, then writes a
    # checkpoint under its 8-device sharding, which this 1-device process restores.
    _ckpt_mesh.write(tmp_path / "one", step=1)
    out = _run(
        "_ckpt_mesh.py",
        tmp_path,
        env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"},
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "OK 8" in out.stdout, out.stdout
    _ckpt_mesh.check(tmp_path / "eight", step=2)


def test_frozen_arrays_from_the_target(tmp_path):
    # LoRA-FA's frozen A is not stored: the target, made with the run's key, supplies it
    method = jl.lora_fa(rank=4, targets=".*kernel")
    adapters = jl_random(method)
    tx = jl.optimizer(optax.adam(1e-3))
    with CheckpointManager(tmp_path / "light", store_frozen=False, async_save=False) as mgr:
        mgr.save(1, adapters=adapters, opt_state=tx.init(adapters))
        st = mgr.restore(
            adapters=method.init(jax.random.key(0), PARAMS),
            opt_state=jax.eval_shape(tx.init, adapters),
        )
        assert_trees_equal(st.adapters, adapters)
        with pytest.raises(CheckpointError, match="the key the run was initialised with"):
            mgr.restore(adapters=method.init(jax.random.key(1), PARAMS))
        with pytest.raises(CheckpointError, match="concrete target"):
            mgr.restore(adapters=jax.eval_shape(method.init, jax.random.key(0), PARAMS))
    with CheckpointManager(tmp_path / "full", async_save=False) as mgr:
        mgr.save(1, adapters=adapters)
    light = checkpoint_bytes(tmp_path / "light" / "1" / "adapters")
    a_bytes = sum(
        array_bytes(n.a)
        for n in jax.tree_util.tree_leaves(adapters, is_leaf=lambda x: isinstance(x, jl.Adapter))
    )
    assert light + a_bytes * 0.9 < checkpoint_bytes(tmp_path / "full" / "1" / "adapters")
