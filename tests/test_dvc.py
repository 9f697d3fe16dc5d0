"""DVC with the SeaweedFS S3 server as remote: push, wipe cache and data, pull, identical files; and dvc.yaml
mirrors the KFP pipeline (same stages, same edges, every stage complete, every command parses)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from craft.io import sha256_file
from craft.storage import dvc

REPO_ROOT = Path(__file__).resolve().parents[1]


def tree_hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def git_repo(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    repo.mkdir()
    env = {"GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1", "HOME": str(tmp_path / "home")}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run(["git", "-C", str(repo), "config", "user.email", "t@example.com"], check=True)
    subprocess.run(["git", "-C", str(repo), "config", "user.name", "t"], check=True)
    return repo


def test_push_wipe_pull_round_trip(s3_env, git_repo):
    repo = git_repo
    data = repo / "data"
    for i in range(5):
        sub = data / ("imgs" if i % 2 else "") / f"x{i}.bin"
        sub.parent.mkdir(parents=True, exist_ok=True)
        sub.write_bytes(os.urandom(200 + i) + bytes([i]) * 50)
    (data / "dataset.yaml").write_text("name: tiny\n")
    want = tree_hashes(data)

    dvc.init_repo(repo)
    bucket = s3_env.make_bucket("dvc")
    dvc.configure_remote(repo, "store", f"s3://{bucket}/dvc", s3_env.endpoint)
    # keys and endpoint stay out of the committed config
    committed = (repo / ".dvc" / "config").read_text()
    assert "endpointurl" not in committed and s3_env.secret_key not in committed
    assert s3_env.secret_key not in (repo / ".dvc" / "config.local").read_text()

    dvc_file = dvc.add(repo, "data")
    version = dvc.dataset_version(dvc_file)
    assert version.endswith(".dir")
    assert dvc.dataset_version(data) == version  # read through data.dvc
    assert dvc.dir_md5(data) == version  # our computation agrees with DVC's
    dvc.push(repo)
    assert any(o.object_name.startswith("dvc/") for o in s3_env.client().list_objects(bucket, recursive=True))

    shutil.rmtree(repo / ".dvc" / "cache")
    shutil.rmtree(data)
    dvc.pull(repo)
    assert tree_hashes(data) == want

    # a change of content is a new version; pushing it with a wrong key fails with dvc's own message
    (data / "x0.bin").write_bytes(b"changed")
    assert dvc.dir_md5(data) != version
    assert dvc.dataset_version(dvc.add(repo, "data")) == dvc.dir_md5(data)
    env = {"AWS_SECRET_ACCESS_KEY": "wrong-secret", "AWS_MAX_ATTEMPTS": "1"}  # botocore: fail fast
    with pytest.raises(dvc.DvcError, match=r"`dvc push` in .* failed with exit code"):
        dvc.push(repo, env=env)
    with pytest.raises(dvc.DvcError, match="no such .dvc file"):
        dvc.dataset_version(repo / "missing.dvc")


def test_repo_dvc_files_parse():
    """The committed dvc.yaml / data.dvc / .dvc/config are valid and carry no endpoint or keys."""
    stages = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
    for name in ("validate", "validate_cxr"):
        st = stages[name]
        assert {"cmd", "deps", "params", "outs"} <= set(st), name
    cfg = (REPO_ROOT / ".dvc" / "config").read_text()
    assert "s3://craft/dvc" in cfg
    for line in cfg.splitlines():
        assert not line.strip().startswith(("access_key_id", "secret_access_key", "endpointurl")), line
    assert dvc.dataset_version(REPO_ROOT / "data.dvc").endswith(".dir")


# ---------------------------------------------------------------------------------- dvc.yaml mirrors the pipeline

# KFP task (display name) -> DVC stage (dvc.yaml): the same names, so `dvc dag` reads like the Kubeflow graph.
KFP_TO_DVC = {
    "data": "data",
    "validate": "validate",
    "annotate": "annotate",
    "pretrain": "pretrain",
    "finetune": "finetune",
    "critic": "critic",
    "evaluator": "evaluator",
    "critic-probe": "critic-probe",
    "evaluator-probe": "evaluator-probe",
    "ti": "ti",
    "ti-lora": "ti-lora",
    "dpo": "dpo",
    "craft": "craft",
    "controlnet-mask": "controlnet-mask",
    "controlnet-mask-plain-base": "controlnet-mask-plain-base",
    "controlnet-mask-eval": "controlnet-mask-eval",
    "controlnet-fluorescence": "controlnet-fluorescence",
    "controlnet-fluorescence-plain-base": "controlnet-fluorescence-plain-base",
    "controlnet-fluorescence-eval": "controlnet-fluorescence-eval",
    "evaluate": "evaluate",
    "gate": "gate",
}
# KFP tasks with no DVC stage (dvc.yaml's header says more); their edges are not compared. A pipeline may lack
# some of them (dataset-version and champion are newer than the others).
KFP_ONLY = {
    "dataset-version": "resolves a dataset pointer on the object store; DVC hashes every dep itself",
    "champion": "downloads the production model from the registry; a local run has none",
    "register": "writes to the registry; only craft promote moves production",
}
# DVC nodes with no KFP task
DVC_ONLY = {
    "data.dvc": "the tracked datasets (dvc pull); the demo-histo run generates its own, as the KFP data step does",
    "validate_cxr": "validates the other tracked dataset, data/demo-cxr; not part of the demo-histo pipeline",
}
# KFP edges dvc.yaml cannot carry until the CLI has the option: edge -> (command, missing option)
CLI_GAPS: dict = {}
# KFP tasks that would have a stage if the CLI exposed their step: task -> the command it would be
MISSING_COMMANDS: dict = {}
# deps that only order two stages (KFP `.after`); every other outputs/ dep is a path the command reads
# the validation report orders every step that uses an MLLM or a GPU after validation (KFP .after(validate))
ORDER_ONLY = {(s, "outputs/validate/demo-histo") for s in (
    "annotate", "pretrain", "finetune", "critic", "evaluator", "critic-probe", "evaluator-probe", "ti", "ti-lora",
    "dpo", "craft", "controlnet-mask", "controlnet-mask-plain-base", "controlnet-mask-eval", "controlnet-fluorescence",
    "controlnet-fluorescence-plain-base", "controlnet-fluorescence-eval", "evaluate",
)}  # fmt: skip


def _stages() -> dict:
    return yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]


def _dep_paths(entries) -> list[str]:
    """dvc.yaml deps/outs entries (a path, or {path: options}) -> paths."""
    return [e if isinstance(e, str) else next(iter(e)) for e in entries]


def kfp_graph(spec: dict) -> tuple[set[str], set[tuple[str, str]]]:
    """(task display names, upstream -> downstream edges) of a compiled pipeline spec.

    An edge is a ``dependentTasks`` entry or an input produced by another task (taskOutputArtifact /
    taskOutputParameter). A task inside a sub-DAG (a dsl.If condition such as gates-passed) also waits for
    everything its group waits for, the condition's own inputs included.
    """
    tasks: set[str] = set()
    edges: set[tuple[str, str]] = set()

    def walk(dag: dict, inherited: set[str]) -> None:
        names = {key: t["taskInfo"]["name"] for key, t in dag["tasks"].items()}
        for key, t in dag["tasks"].items():
            ups = set(t.get("dependentTasks", []))
            for kind in ("artifacts", "parameters"):
                for inp in t.get("inputs", {}).get(kind, {}).values():
                    for ref in ("taskOutputArtifact", "taskOutputParameter"):
                        if ref in inp:
                            ups.add(inp[ref]["producerTask"])
            upstream = inherited | {names[k] for k in ups}
            sub = spec["components"][t["componentRef"]["name"]].get("dag")
            if sub is not None:
                walk(sub, upstream)
            else:
                tasks.add(names[key])
                edges.update((u, names[key]) for u in upstream)

    walk(spec["root"]["dag"], set())
    return tasks, edges


def dvc_graph(repo: Path) -> tuple[set[str], set[tuple[str, str]]]:
    """Nodes and edges of `dvc dag --dot` in ``repo``."""
    dot = dvc.run_dvc(repo, "dag", "--dot")
    edges = set(re.findall(r'^"([^"]+)" -> "([^"]+)";$', dot, re.M))
    nodes = set(re.findall(r'^"([^"]+)";$', dot, re.M))
    return nodes, edges


def _cli_command(args: list[str]):
    """The `craft` command ``args`` name (through its groups), the arguments left for it, its name and parent
    context. Only click's command protocol (make_context, resolve_command): typer 0.29 ships its own click."""
    import typer

    from craft.cli import app

    cmd, rest, path, ctx = typer.main.get_command(app), list(args), "craft", None
    while hasattr(cmd, "resolve_command"):  # a group: `craft train ...`; the groups have no options of their own
        ctx = cmd.make_context(path, list(rest), parent=ctx)
        name, cmd, rest = cmd.resolve_command(ctx, rest)
        path = f"{path} {name}"
    return cmd, rest, path, ctx


def test_dvc_dag_mirrors_the_kfp_pipeline(tmp_path, git_repo):
    """`dvc dag` has one stage per KFP task and the same edges (names: KFP_TO_DVC; exceptions listed above)."""
    from pipelines.craft_pipeline import compile_pipeline

    spec = next(yaml.safe_load_all(compile_pipeline(tmp_path / "p.yaml", "demo-histo").read_text()))
    kfp_tasks, kfp_edges = kfp_graph(spec)
    unmapped = kfp_tasks - set(KFP_TO_DVC) - set(KFP_ONLY)
    assert not unmapped, f"KFP tasks with no DVC stage: {sorted(unmapped)}; add them to dvc.yaml and KFP_TO_DVC"
    assert set(KFP_TO_DVC) <= kfp_tasks, f"no longer in the pipeline: {sorted(set(KFP_TO_DVC) - kfp_tasks)}"
    assert set(CLI_GAPS) <= kfp_edges, "a CLI gap names an edge the pipeline no longer has: drop it"
    want = {(KFP_TO_DVC[u], KFP_TO_DVC[v]) for u, v in kfp_edges if u not in KFP_ONLY and v not in KFP_ONLY}
    want -= {(KFP_TO_DVC[u], KFP_TO_DVC[v]) for u, v in CLI_GAPS}

    # `dvc dag` for real, on a copy of the files it reads (it writes .dvc/tmp; the repo stays untouched)
    (git_repo / ".dvc").mkdir()
    for name in (".dvc/config", "dvc.yaml", "data.dvc"):
        shutil.copyfile(REPO_ROOT / name, git_repo / name)
    dvc.init_repo(git_repo)  # keeps DVC's site cache inside the copy
    nodes, edges = dvc_graph(git_repo)
    assert nodes - set(DVC_ONLY) == set(KFP_TO_DVC.values())
    got = {(u, v) for u, v in edges if u not in DVC_ONLY and v not in DVC_ONLY}
    assert not want - got, f"KFP edges missing from dvc.yaml (add the deps): {sorted(want - got)}"
    assert not got - want, f"dvc.yaml edges the pipeline does not have: {sorted(got - want)}"


def test_cli_gaps_are_still_gaps():
    """Once the CLI gains an option of CLI_GAPS or a command of MISSING_COMMANDS, dvc.yaml must use it."""
    for edge, (command, option) in CLI_GAPS.items():
        cmd, _, name, _ = _cli_command([command])
        opts = {o for p in cmd.params for o in p.opts}
        assert option not in opts, f"`{name}` has {option} now: mirror {edge} in dvc.yaml and drop it from CLI_GAPS"
    for task, command in MISSING_COMMANDS.items():
        try:
            _cli_command([command])
        except Exception as e:  # click's UsageError
            assert "No such command" in str(e), e
        else:
            raise AssertionError(f"`craft {command}` exists now: add the {task} stage, drop it from MISSING_COMMANDS")


def test_every_stage_is_complete():
    """STYLE 8: cmd, deps (data and code), params (existing profile sections) and outs in every stage; each dep
    is a repository file, a tracked dataset or another stage's output, and the command reads what it lists."""
    stages = _stages()
    outs = {p: name for name, st in stages.items() for p in _dep_paths(st.get("outs", []))}
    tracked = [o["path"] for o in yaml.safe_load((REPO_ROOT / "data.dvc").read_text())["outs"]]
    for name, st in stages.items():
        assert {"cmd", "deps", "params", "outs"} <= set(st), name
        deps = _dep_paths(st["deps"])
        assert any(d.startswith("craft/") and d.endswith(".py") for d in deps), f"{name}: no code dep"
        for d in deps:
            if d in outs:
                assert outs[d] != name, f"{name}: {d} is its own output"
            elif d.startswith(tuple(f"{t}/" for t in tracked)):
                continue  # a tracked dataset (dvc pull)
            else:
                assert (REPO_ROOT / d).is_file(), f"{name}: dep {d} is neither a file nor a stage output"
        assert all(o.startswith("outputs/") for o in _dep_paths(st["outs"])), name
        args = shlex.split(st["cmd"])
        assert args[:1] == ["craft"], f"{name}: not a craft command"
        (params,) = st["params"]
        ((pfile, sections),) = params.items()
        profile = yaml.safe_load((REPO_ROOT / pfile).read_text())
        assert sections and set(sections) <= set(profile), f"{name}: {pfile} lacks {set(sections) - set(profile)}"
        assert args[args.index("--config") + 1] == pfile, f"{name}: --config differs from the params file"
        paths = {p for a in args for p in re.split(r"[=:]", a) if p.startswith(("outputs/", "data/"))}
        listed = set(deps) | set(_dep_paths(st["outs"]))
        assert paths <= listed, f"{name}: the command uses {sorted(paths - listed)} without listing them"
        order_only = {d for s, d in ORDER_ONLY if s == name}
        unread = {d for d in deps if d.startswith("outputs/") and d not in paths} - order_only
        assert not unread, f"{name}: deps the command never reads {sorted(unread)} (ORDER_ONLY if intended)"


def test_every_stage_command_parses_with_the_cli():
    """Each cmd parses with the real `craft` CLI (options, required arguments, types): a renamed option fails."""
    for name, st in _stages().items():
        try:
            cmd, rest, path, parent = _cli_command(shlex.split(st["cmd"])[1:])
            cmd.make_context(path, rest, parent=parent)
        except Exception as e:  # click's UsageError / BadParameter: name the stage
            raise AssertionError(f"dvc.yaml stage {name}: `{st['cmd']}` does not parse: {e}") from None
