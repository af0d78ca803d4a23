"""No input file can crash the agent (issue 9): documents past the limits of
``supervisor.config.limits``, symlink loops, unreadable and special files -- in every
format, at start, from ``validate`` and on reload -- are a config error naming the file."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from supervisor.config import load_config
from supervisor.config.formats import hcl_parser
from supervisor.config.limits import MAX_DEPTH, MAX_FILE_BYTES, MAX_STRING_CHARS
from supervisor.errors import ConfigError
from tests.helpers.agent import AgentProcess, fake_proxy
from tests.helpers.processes import wait_until
from tests.helpers.unprivileged import Unprivileged

DEEP = 700


def deep_json() -> str:
    return (
        '{"services": [{"name": "w", "connect": {"proxy": {"config": '
        + '{"a": ' * DEEP
        + "1"
        + "}" * DEEP
        + "}}}]}"
    )


def deep_toml() -> str:
    return "x = " + "[" * DEEP + "]" * DEEP + "\n"


def deep_hcl() -> str:
    return 'service { name = "w"\n meta ' + "{ a " * DEEP + "= 1" + "}" * DEEP + "}\n"


HOSTILE: dict[str, tuple[str, Callable[[], str], str]] = {
    "deep-json": ("a.json", deep_json, f"nested more than {MAX_DEPTH} levels deep"),
    "deep-toml": ("a.toml", deep_toml, f"nested more than {MAX_DEPTH} levels deep"),
    "deep-hcl": ("a.hcl", deep_hcl, f"nested more than {MAX_DEPTH} levels deep"),
    "long-number-json": (
        "a.json",
        lambda: '{"ports": {"http": ' + "9" * 5000 + "}}",
        "at most 64 are allowed",
    ),
    "long-number-toml": ("a.toml", lambda: "node_name = " + "9" * 5000 + "\n", "more than 64 digits"),
    "long-number-hcl": ("a.hcl", lambda: "node_name = " + "9" * 5000 + "\n", "more than 64 digits"),
    "big-number-toml": ("a.toml", lambda: "node_name = " + "9" * 100 + "\n", "more than 64 digits"),
    "long-string": ("a.json", lambda: json.dumps({"node_name": "x" * (MAX_STRING_CHARS + 1)}), "characters"),
    "nan": ("a.json", lambda: '{"ports": {"http": NaN}}', "NaN is not a JSON number"),
    "huge-file": ("a.json", lambda: " " * (MAX_FILE_BYTES + 1), "larger than 4 MiB"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_documents_are_config_errors_naming_the_file(tmp_path: Path, case: str) -> None:
    name, text, expected = HOSTILE[case]
    (tmp_path / name).write_text(text())
    with pytest.raises(ConfigError) as raised:
        load_config([], [str(tmp_path)], {"data_dir": "/x"})
    message = str(raised.value)
    assert str(tmp_path / name) in message and expected in message, message
    assert len(message) < 2000  # a deep key path is shortened, not printed 700 levels long


def test_a_symlink_loop_is_a_config_error_naming_the_file(tmp_path: Path) -> None:
    os.symlink("loop.json", tmp_path / "loop.json")
    with pytest.raises(ConfigError, match="loop.json: cannot read file: Too many levels of symbolic links"):
        load_config([], [str(tmp_path)], {"data_dir": "/x"})


def test_a_fifo_given_as_config_file_does_not_hang(tmp_path: Path) -> None:
    fifo = tmp_path / "agent.json"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match="agent.json: cannot read file: not a regular file"):
        load_config([str(fifo)], [], {"data_dir": "/x"})


def test_a_symlinked_drop_in_whose_target_cannot_be_reached_is_a_config_error(nobody: Unprivileged) -> None:
    """As an unprivileged agent: the target lives in a directory the agent may not enter."""
    root = nobody.make_dir("unreadable")
    secret = root / "secret"
    secret.mkdir(mode=0o700)  # owned by root
    (secret / "web.json").write_text("{}")
    conf = root / "conf.d"
    conf.mkdir()
    conf.chmod(0o755)
    os.symlink(secret / "web.json", conf / "web.json")
    try:
        result = subprocess.run(
            [*nobody.prefix, nobody.python, "-m", "supervisor", "validate", str(conf)],
            capture_output=True,
            text=True,
            timeout=60,
            env=nobody.env(),
            cwd=nobody.pythonpath,
        )
    finally:
        shutil.rmtree(root)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "conf.d/web.json: cannot read file: Permission denied" in result.stderr


def test_pyhcl_extension_keeps_the_grammar_and_builds_lists_in_linear_time() -> None:
    from hcl.parser import HclParser

    from supervisor.config.formats import _ConsulHclParser

    # stock pyhcl productions, with only our (deliberately different) repeated-key handling
    stock = type("Stock", (HclParser,), {"objectlist_flat": _ConsulHclParser.objectlist_flat})()
    fixtures = Path(__file__).parent / "fixtures" / "consul"
    examples = Path(__file__).parent.parent / "examples"
    texts = [path.read_text() for path in [*fixtures.glob("*.hcl"), *examples.rglob("*.hcl")]]
    assert texts
    for text in texts:
        assert hcl_parser().parse(text) == stock.parse(text)
    # 100,000 list elements: stock pyhcl copies the list per element (about 15 s here)
    tags = ",".join(f'"t{i}"' for i in range(100_000))
    parsed = hcl_parser().parse(f'service {{ name = "w"\n tags = [{tags}] }}\n')
    assert len(parsed["service"]["tags"]) == 100_000


def test_validate_exits_2_without_a_traceback(tmp_path: Path) -> None:
    (tmp_path / "deep.toml").write_text(deep_toml())
    os.symlink("loop.json", tmp_path / "loop.json")
    result = subprocess.run(
        [sys.executable, "-m", "supervisor", "validate", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "deep.toml: nested more than 64 levels deep" in result.stderr
    assert "loop.json: cannot read file" in result.stderr


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[AgentProcess]:
    process = AgentProcess(tmp_path, extra={"connect": {"proxy": {"allow_managed_root": True}}})
    yield process
    process.kill_everything()


def web(tmp_path: Path) -> dict[str, object]:
    return {
        "service": {
            "name": "web",
            "port": 8080,
            "connect": {"proxy": {"command": fake_proxy("run", tmp_path / "w.state")}},
        }
    }


def test_hostile_files_on_reload_keep_the_agent_and_its_proxies(agent: AgentProcess, tmp_path: Path) -> None:
    agent.write("web.json", web(tmp_path))
    agent.start()
    pid = agent.wait_state("web-proxy", "running")["Pid"]
    for name, text, _expected in HOSTILE.values():
        agent.write(name, text())
        result = agent.cli("reload")
        assert result.returncode == 2 and name in result.stderr, result.stderr
        (agent.config_dir / name).unlink()
    os.symlink("loop.json", agent.config_dir / "loop.json")
    assert agent.cli("reload").returncode == 2
    assert agent.process is not None and agent.process.poll() is None
    assert "Traceback" not in agent.current_log()
    assert agent.proxy("web-proxy")["Pid"] == pid  # type: ignore[index]
    (agent.config_dir / "loop.json").unlink()
    assert agent.cli("reload").returncode == 0


def test_a_hostile_file_at_start_exits_2_with_the_file_named(agent: AgentProcess) -> None:
    agent.write("deep.toml", deep_toml())
    agent.start(wait=False)
    assert agent.wait_exit(30) == 2
    assert "deep.toml" in agent.current_log() and "Traceback" not in agent.current_log()


def test_a_large_file_does_not_delay_the_restart_of_a_crashed_proxy(
    agent: AgentProcess, tmp_path: Path
) -> None:
    """The reload of a ~3.5 MiB HCL drop-in takes seconds (pyhcl is pure Python); it runs
    on a worker, so a proxy that crashes meanwhile is restarted at once."""
    agent.write("web.json", web(tmp_path))
    agent.start()
    pid = agent.wait_state("web-proxy", "running")["Pid"]
    blocks = "".join(
        f'service {{ name = "s{i}"\n port = {i % 60000 + 1}\n tags = ["a", "b", "c"] }}\n'
        for i in range(50_000)
    )
    assert len(blocks) < MAX_FILE_BYTES
    (agent.config_dir / "big.hcl").write_text(blocks)
    wait_until(lambda: "reading the configuration (config files changed)" in agent.current_log(), timeout=10)
    os.kill(pid, signal.SIGKILL)
    restarted = agent.wait_proxy("web-proxy", lambda e: e["Pid"] not in (None, pid), timeout=10)
    wait_until(lambda: "configuration reloaded (config files changed)" in agent.current_log(), timeout=60)
    log = agent.current_log()
    # the restart came while the file was still being read, not after
    assert log.index(f"started pid {restarted['Pid']}") < log.index(
        "configuration reloaded (config files changed)"
    )
