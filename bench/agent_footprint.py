"""Benchmark: the installed size of the agent's environment, against the fleet's, in one run.

Two fresh venvs in a temporary directory (``python -m venv``, as ``deploy/install-agent.sh``
makes one: pip and setuptools come with it), one with ``edgefleet[agent]`` and, as the
baseline, one with ``edgefleet[fleet]``, each installed by its own pip from a local path (a
snapshot of this tree's tracked and untracked-but-not-ignored files, so the build writes
nothing into the checkout; pip's cache is used). For each:

* the bytes of site-packages (every file's ``st_size``, symlinks not followed), and of the
  whole venv; beside them what the files take on disk (``st_blocks``);
* the distributions (``importlib.metadata`` run by that venv's python) and the ten largest,
  each sized from the files its RECORD lists; what no RECORD claims is "unattributed";
* ``agent_to_fleet_ratio``: agent site-packages bytes / fleet site-packages bytes.

The agent venv must hold no web framework, ORM or CLI kit: none of fastapi, starlette,
sqlalchemy, sqlmodel, pydantic, uvicorn, typer, rich, httpx, psycopg (nor a distribution
named after one, such as pydantic-core or psycopg-binary). Any found are named in
``fleet_only_in_agent`` and the exit status is 1 (2: the bench itself failed). The same
check run on the fleet venv must find them (``fleet_venv_has``): a check that finds nothing
there is broken.

Then the agent's import cost, in the agent venv (``python -I``, from a directory outside
the tree): peak RSS (``ru_maxrss`` of that child alone, from ``os.wait4``) and wall time,
best of three, of ``import agent.daemon, agent.endpoint, agent.installer``, beside the bare
interpreter and ``import numpy, onnxruntime`` (what loading a model adds anyway; the agent
imports onnxruntime only then).

One line per step with the seconds elapsed, then tables; the last line is one JSON object.

    python bench/agent_footprint.py                   # both venvs (~1 min with a warm cache)
    python bench/agent_footprint.py --skip-fleet      # the agent venv only, no ratio
    python bench/agent_footprint.py --keep /tmp/fp    # keep the venvs in /tmp/fp/{agent,fleet}
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# What a device must not carry: the fleet's web framework, ORM, settings, CLI and client kits.
FORBIDDEN = ("fastapi", "starlette", "sqlalchemy", "sqlmodel", "pydantic", "uvicorn", "typer",
             "rich", "httpx", "psycopg")
IMPORTS = "import agent.daemon, agent.endpoint, agent.installer"
MB = 1e6

# Run by each venv's own python (stdlib only): its site-packages and its distributions, each
# sized from the files its RECORD lists.
_PROBE = r"""
import importlib.metadata as metadata, json, os, re, sys, sysconfig
site = os.path.realpath(sysconfig.get_paths()["purelib"])
seen, dists = set(), []
for dist in metadata.distributions():
    name = re.sub(r"[-_.]+", "-", dist.metadata["Name"] or "?").lower()
    if name in seen:
        continue
    seen.add(name)
    size = in_site = count = 0
    top = {}
    for entry in dist.files or ():
        path = os.path.realpath(dist.locate_file(entry))
        try:
            length = os.lstat(path).st_size
        except OSError:
            continue
        size += length
        count += 1
        if path.startswith(site + os.sep):
            in_site += length
            first = os.path.relpath(path, site).split(os.sep)[0]
            top[first] = top.get(first, 0) + length
    dists.append({"name": name, "version": dist.version, "bytes": size, "in_site": in_site,
                  "files": count, "top": top})
print(json.dumps({"site": site, "python": sys.version.split()[0], "dists": dists}))
"""

_AGENT_FACTS = IMPORTS + r"""
import json, sys
print(json.dumps({"agent_file": sys.modules["agent"].__file__, "modules": len(sys.modules),
                  "numpy": "numpy" in sys.modules, "onnxruntime": "onnxruntime" in sys.modules,
                  "msgspec": "msgspec" in sys.modules}))
"""


class Progress:
    def __init__(self) -> None:
        self.started = time.perf_counter()

    def __call__(self, message: str) -> None:
        print(f"[{time.perf_counter() - self.started:6.1f} s] {message}", flush=True)


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def forbidden_in(names: list[str]) -> list[str]:
    """The distributions named after a forbidden one (itself, or ``<name>-...``)."""
    return sorted(n for n in names if any(n == f or n.startswith(f + "-") for f in FORBIDDEN))


def snapshot(dest: Path) -> Path:
    """This tree's tracked and untracked-but-not-ignored files, copied: pip builds in the
    source directory (``build/``, ``*.egg-info``), and the checkout is shared."""
    listed = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "-co", "--exclude-standard"],
                            capture_output=True, check=True).stdout.decode()
    for relative in filter(None, listed.split("\0")):
        source = ROOT / relative
        if source.is_file():  # tracked but deleted in the working tree: skipped
            (dest / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / relative)
    return dest


def make_venv(venv: Path, requirement: str, log: Path, progress: Progress) -> Path:
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    progress(f"{venv.name}: venv made; pip install {requirement} (log: {log})")
    started = time.perf_counter()
    with open(log, "w") as out:
        done = subprocess.run([str(python), "-m", "pip", "install", "--disable-pip-version-check",
                               requirement], stdout=out, stderr=subprocess.STDOUT)
    if done.returncode:
        print("".join(log.read_text().splitlines(keepends=True)[-20:]), file=sys.stderr)
        print(f"pip install {requirement} failed (all of it in {log})", file=sys.stderr)
        sys.exit(2)
    progress(f"{venv.name}: installed in {time.perf_counter() - started:.1f} s")
    return python


def tree_size(top: Path) -> tuple[int, int, int]:
    """(bytes by st_size, bytes on disk, files) under ``top``, symlinks not followed."""
    size = disk = files = 0
    for directory, _, names in os.walk(top):
        for name in names:
            info = os.lstat(os.path.join(directory, name))
            size += info.st_size
            disk += info.st_blocks * 512
            files += 1
    return size, disk, files


def measure(venv: Path, python: Path) -> dict:
    probe = json.loads(subprocess.run([str(python), "-I", "-c", _PROBE], capture_output=True,
                                      text=True, check=True, cwd=venv).stdout)
    site = Path(probe["site"])
    site_bytes, site_disk, site_files = tree_size(site)
    venv_bytes, venv_disk, _ = tree_size(venv)
    dists = sorted(probe["dists"], key=lambda d: d["bytes"], reverse=True)
    return {
        "python": probe["python"], "site": site, "site_bytes": site_bytes,
        "site_disk": site_disk, "site_files": site_files, "venv_bytes": venv_bytes,
        "venv_disk": venv_disk, "dists": dists,
        "unattributed": site_bytes - sum(d["in_site"] for d in dists),
        "forbidden": forbidden_in([d["name"] for d in dists]),
    }


def child_cost(argv: list[str], cwd: Path) -> tuple[float, float, str]:
    """(peak RSS in MB, wall seconds, stdout) of one child: its own ``ru_maxrss`` from
    ``wait4``, not RUSAGE_CHILDREN's maximum over every child so far (pip's included)."""
    with tempfile.TemporaryFile() as out:
        started = time.perf_counter()
        child = subprocess.Popen(argv, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - started
        child.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read().decode(errors="replace")
    if child.returncode:
        raise RuntimeError(f"{argv} exited {child.returncode}:\n{text}")
    return usage.ru_maxrss / 1024, seconds, text


def import_costs(python: Path, cwd: Path, runs: int = 3) -> tuple[dict[str, tuple], dict]:
    """Best of ``runs`` (RSS, seconds) for each program, rotated so noise hits all alike."""
    programs = {"python": "pass", "numpy+ort": "import numpy, onnxruntime",
                "agent": _AGENT_FACTS}
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in programs}
    facts: dict = {}
    for _ in range(runs):
        for name, program in programs.items():
            rss, seconds, out = child_cost([str(python), "-I", "-c", program], cwd)
            results[name].append((rss, seconds))
            if name == "agent":
                facts = json.loads(out.splitlines()[-1])
    best = {name: (min(r for r, _ in values), min(s for _, s in values))
            for name, values in results.items()}
    return best, facts


def print_venv(label: str, figures: dict) -> None:
    print(f"\n{label} venv (Python {figures['python']}): site-packages "
          f"{figures['site_bytes'] / MB:.1f} MB in {figures['site_files']} files "
          f"({figures['site_disk'] / MB:.1f} MB on disk); whole venv "
          f"{figures['venv_bytes'] / MB:.1f} MB; {len(figures['dists'])} distributions")
    print(f"  {'distribution':28s} {'version':>12s} {'MB':>8s} {'files':>6s} {'share':>6s}")
    for dist in figures["dists"][:10]:
        print(f"  {dist['name']:28s} {dist['version']:>12s} {dist['bytes'] / MB:8.2f} "
              f"{dist['files']:6d} {dist['in_site'] / figures['site_bytes']:6.1%}")
    rest = figures["dists"][10:]
    print(f"  {f'({len(rest)} others)':28s} {'':>12s} "
          f"{sum(d['bytes'] for d in rest) / MB:8.2f} {sum(d['files'] for d in rest):6d}")
    print(f"  {'(unattributed)':28s} {'':>12s} {figures['unattributed'] / MB:8.2f}")


def top_ten(figures: dict) -> dict[str, float]:
    return {d["name"]: round(d["bytes"] / MB, 2) for d in figures["dists"][:10]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, metavar="DIR",
                        help="make the venvs in DIR/agent and DIR/fleet and keep them")
    parser.add_argument("--skip-fleet", action="store_true",
                        help="skip the fleet venv (the baseline): no ratio")
    args = parser.parse_args()

    progress = Progress()
    with tempfile.TemporaryDirectory(prefix="edgefleet-footprint-") as tmp:
        work = Path(tmp)
        where = work
        if args.keep:
            where = args.keep.resolve()
            taken = [p for p in (where / "agent", where / "fleet") if p.exists()]
            if taken:
                parser.error(f"{', '.join(map(str, taken))} already exist(s): give another DIR")
            where.mkdir(parents=True, exist_ok=True)
        source = snapshot(work / "edgefleet")
        progress(f"source: {source} (a snapshot of {ROOT})")

        agent_python = make_venv(where / "agent", f"{source}[agent]", where / "pip-agent.log",
                                 progress)
        agent = measure(where / "agent", agent_python)
        progress(f"agent: measured ({len(agent['dists'])} distributions)")
        fleet = None
        if not args.skip_fleet:
            fleet_python = make_venv(where / "fleet", f"{source}[fleet]",
                                     where / "pip-fleet.log", progress)
            fleet = measure(where / "fleet", fleet_python)
            progress(f"fleet: measured ({len(fleet['dists'])} distributions)")
        costs, facts = import_costs(agent_python, work)
        if not str(facts.get("agent_file", "")).startswith(str(agent["site"])):
            print(f"the import found agent at {facts.get('agent_file')}, not in {agent['site']}",
                  file=sys.stderr)
            sys.exit(2)
        progress("agent: import cost measured (best of 3)")

    print_venv("agent", agent)
    edgefleet = next((d for d in agent["dists"] if d["name"] == "edgefleet"), None)
    if edgefleet:
        parts = ", ".join(f"{name} {size / 1e3:.0f} kB"
                          for name, size in sorted(edgefleet["top"].items(),
                                                   key=lambda item: -item[1])[:4])
        print(f"  edgefleet itself: {edgefleet['bytes'] / 1e3:.0f} kB ({parts})")
    figures: dict[str, object] = {
        "agent_site_packages_mb": round(agent["site_bytes"] / MB, 1),
        "agent_site_packages_disk_mb": round(agent["site_disk"] / MB, 1),
        "agent_venv_mb": round(agent["venv_bytes"] / MB, 1),
        "agent_distributions": len(agent["dists"]),
    }
    if fleet:
        print_venv("fleet", fleet)
        agent_names = {d["name"] for d in agent["dists"]}
        extra = [d for d in fleet["dists"] if d["name"] not in agent_names]
        print(f"\nthe fleet adds {len(extra)} distributions, "
              f"{sum(d['bytes'] for d in extra) / MB:.1f} MB: "
              + ", ".join(d["name"] for d in extra))
        ratio = agent["site_bytes"] / fleet["site_bytes"]
        print(f"agent / fleet site-packages: {ratio:.3f}")
        figures.update({
            "fleet_site_packages_mb": round(fleet["site_bytes"] / MB, 1),
            "fleet_venv_mb": round(fleet["venv_bytes"] / MB, 1),
            "fleet_distributions": len(fleet["dists"]),
            "agent_to_fleet_ratio": round(ratio, 3),
            "agent_venv_to_fleet_venv_ratio": round(agent["venv_bytes"] / fleet["venv_bytes"], 3),
            "fleet_venv_has": fleet["forbidden"],
        })
    print(f"\nforbidden in the agent venv: {', '.join(agent['forbidden']) or 'none'}")
    print(f"import cost in the agent venv ({facts.get('modules')} modules loaded; "
          f"numpy {facts.get('numpy')}, onnxruntime {facts.get('onnxruntime')}; "
          f"from {facts.get('agent_file')}):")
    labels = {"python": "python -c pass", "numpy+ort": "import numpy, onnxruntime",
              "agent": IMPORTS}
    for name, (rss, seconds) in costs.items():
        print(f"  {labels[name]:55s} {rss:7.1f} MB peak RSS {seconds * 1000:7.0f} ms")
    figures.update({
        "fleet_only_in_agent": agent["forbidden"],
        "agent_import_rss_mb": round(costs["agent"][0], 1),
        "python_rss_mb": round(costs["python"][0], 1),
        "numpy_onnxruntime_import_rss_mb": round(costs["numpy+ort"][0], 1),
        "agent_import_vs_python_rss": round(costs["agent"][0] / costs["python"][0], 3),
        "agent_import_s": round(costs["agent"][1], 3),
        "agent_top10_mb": top_ten(agent),
    })
    if fleet:
        figures["fleet_top10_mb"] = top_ten(fleet)
    print(json.dumps(figures))
    if agent["forbidden"]:
        sys.exit(f"the agent's environment holds {', '.join(agent['forbidden'])}")


if __name__ == "__main__":
    main()
