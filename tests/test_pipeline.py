"""The flow's cache: a re-run does no work, a config edit re-runs what reads it and what
follows, --from forces, an interrupted stage resumes."""
import pytest

from licforge.flows.pipeline import Pipeline, Stage


def make(calls, fail=None):
    def step(name):
        def fn(ctx):
            if fail is not None and fail.get(name):
                raise RuntimeError(f"{name} interrupted")
            calls.append(name)
            (ctx.dir / "out.txt").write_text(name)
            return {"value": ctx.config.get(name, {}).get("x", 0) + sum(r["value"] for r in ctx.results.values())}
        return fn
    return Pipeline([Stage("a", step("a"), reads=("a",)),
                     Stage("b", step("b"), reads=("b",), after=("a",)),
                     Stage("c", step("c"), reads=(), after=("b",))])


def test_rerun_does_no_work(tmp_path):
    calls = []
    p = make(calls)
    cfg = {"a": {"x": 1}, "b": {"x": 2}}
    first = p.run(tmp_path, cfg, log=lambda s: None)
    assert calls == ["a", "b", "c"] and [r.result["value"] for r in first] == [1, 3, 4]
    second = p.run(tmp_path, cfg, log=lambda s: None)
    assert calls == ["a", "b", "c"] and not any(r.ran for r in second)
    assert [r.result for r in second] == [r.result for r in first]


def test_config_edit_reruns_dependents_only(tmp_path):
    calls = []
    p = make(calls)
    p.run(tmp_path, {"a": {"x": 1}, "b": {"x": 2}}, log=lambda s: None)
    calls.clear()
    recs = p.run(tmp_path, {"a": {"x": 1}, "b": {"x": 5}}, log=lambda s: None)
    assert calls == ["b", "c"]
    assert [r.ran for r in recs] == [False, True, True]
    assert recs[1].result["value"] == 5 + 1 and recs[2].result["value"] == 1 + 6


def test_force_from(tmp_path):
    calls = []
    p = make(calls)
    cfg = {"a": {"x": 1}}
    p.run(tmp_path, cfg, log=lambda s: None)
    calls.clear()
    p.run(tmp_path, cfg, force_from="b", log=lambda s: None)
    assert calls == ["b", "c"]
    with pytest.raises(KeyError, match="no such stage"):
        p.run(tmp_path, cfg, force_from="zz", log=lambda s: None)


def test_interrupted_stage_resumes(tmp_path):
    calls = []
    with pytest.raises(RuntimeError, match="b interrupted"):
        make(calls, fail={"b": True}).run(tmp_path, {}, log=lambda s: None)
    assert calls == ["a"] and not (tmp_path / "b" / "stage.json").exists()
    calls.clear()
    make(calls).run(tmp_path, {}, log=lambda s: None)
    assert calls == ["b", "c"]
