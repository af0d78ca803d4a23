"""``proxy-supervisor convert``: managed proxies become sidecar services that run the same
proxy -- same port, upstreams, local service and config -- in the input's format, with
what cannot be carried over said on stderr (``supervisor/config/convert.py``,
``supervisor/config/writers.py``, ``supervisor/cli/convert_command.py``)."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import pytest

from supervisor.cli.main import main as run
from supervisor.config.build import build_config
from supervisor.config.convert import convert_document
from supervisor.config.formats import parse_text
from supervisor.config.sources import Source
from supervisor.config.writers import dump
from supervisor.supervision.desired import plan_proxies

WEB: dict[str, Any] = {
    "name": "web",
    "port": 8080,
    "tags": ["v1"],
    "connect": {
        "proxy": {
            "config": {
                "bind_port": 20100,
                "handshake_timeout_ms": 5000,
                "upstreams": [{"destination_name": "db", "local_bind_port": 9191}],  # Consul 1.2's place
            }
        }
    },
}
DB: dict[str, Any] = {
    "name": "db",
    "port": 5432,
    "connect": {"proxy": {"upstreams": [{"destination_name": "cache", "local_bind_port": 6000}]}},
}


def planned(document: dict[str, Any], fmt: str = "json") -> dict[str, Any]:
    """What the agent would run for ``document``, with sidecars supervised: proxy name ->
    (port, upstreams, config the proxy reads)."""
    text = dump(document, fmt)
    supervise = {"connect": {"proxy": {"supervise_sidecars": True}}, "data_dir": "/d"}
    config = build_config([Source(f"x.{fmt}", fmt, text)], supervise)
    plan = plan_proxies(config, "127.0.0.1:8500", {}, lambda host, port: True, rng=random.Random(3))
    return {
        p.service.name: (
            p.port,
            [(u.destination_name, u.local_bind_port) for u in p.upstreams],
            {k: v for k, v in p.config.items() if k not in ("bind_port", "bind_address")},
        )
        for p in plan.proxies.values()
    }


@pytest.mark.parametrize("fmt", ["json", "hcl", "toml"])
def test_the_sidecar_runs_the_same_proxy_as_the_managed_one(fmt: str) -> None:
    original = {"services": [WEB, DB]}
    result = convert_document(parse_text(dump(original, fmt), fmt, f"x.{fmt}"))
    assert result.converted == ("services[0]", "services[1]")
    before, after = planned(original, fmt), planned(result.document, fmt)
    assert after["web"] == before["web"]  # port 20100 kept, upstreams moved, config kept
    # db's port was assigned by the agent: the sidecar takes one of the sidecar range.
    assert after["db"][1:] == before["db"][1:] and after["db"][0] == 21000
    sidecar = result.document["services"][0]["connect"]["sidecar_service"]
    assert sidecar["port"] == 20100 and "proxy" not in result.document["services"][0]["connect"]
    # The whole document is still what it was apart from connect.
    assert {k: v for k, v in result.document["services"][0].items() if k != "connect"} == {
        k: v for k, v in WEB.items() if k != "connect"
    }


def test_what_cannot_be_carried_over_is_said() -> None:
    custom = {
        "name": "api",
        "port": 7000,
        "connect": {"proxy": {"command": ["/bin/my-proxy", "-x"], "exec_mode": "script", "user": "px"}},
    }
    result = convert_document({"service": custom, "connect": {"proxy_defaults": {"command": ["/bin/p"]}}})
    text = "\n".join(str(note) for note in result.notes)
    assert "'/bin/my-proxy -x' is not carried over" in text and "-sidecar-for api" in text
    assert "exec_mode 'script'" in text and "connect.proxy.user" in text
    assert "assigned by the agent" in text and "connect.proxy_defaults" in text


def test_assigned_ports_are_kept_from_the_data_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "db.json").write_text(json.dumps({"service": DB}))
    (tmp_path / "data" / "proxy").mkdir(parents=True)
    allocations = {
        "Version": 1,
        "Proxies": {"db-proxy": {"Token": "secret-9f2", "Port": 20042, "PortAuto": True}},
    }
    (tmp_path / "data" / "proxy" / "allocations.json").write_text(json.dumps(allocations))
    assert run(["convert", "-data-dir", str(tmp_path / "data"), str(tmp_path / "conf")]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["service"]["connect"]["sidecar_service"]["port"] == 20042
    assert "kept port 20042" in err
    assert "secret-9f2" not in out + err  # the tokens beside the ports stay where they are


def test_write_puts_the_result_beside_and_never_over_a_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "web.hcl"
    source.write_text(dump({"service": WEB}, "hcl"))
    assert run(["convert", "-write", str(source)]) == 0
    written = tmp_path / "web.sidecar.hcl"
    document = parse_text(written.read_text(), "hcl", str(written))
    assert document["service"]["connect"]["sidecar_service"]["port"] == 20100
    assert "written to" in capsys.readouterr().err
    assert run(["convert", "-write", str(source)]) == 2
    assert "exists already; pass -force" in capsys.readouterr().err
    assert run(["convert", "-write", "-force", str(source)]) == 0
    # A directory skips what convert wrote before.
    capsys.readouterr()
    assert run(["convert", str(tmp_path)]) == 0
    assert "web.sidecar.hcl" not in capsys.readouterr().err


def test_bad_input_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text('{"service": ')
    assert run(["convert", str(broken)]) == 2
    assert "broken.json" in capsys.readouterr().err
    assert run(["convert", str(tmp_path / "missing.json")]) == 2
    assert "no such file" in capsys.readouterr().err
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps({"service": {"name": "x", "port": 1}}))
    assert run(["convert", str(plain)]) == 0
    assert "no managed proxies" in capsys.readouterr().err


def test_hostile_files_are_clear_errors_never_tracebacks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cases = {
        "port.json": {"service": {"name": "a", "connect": {"proxy": {"config": {"bind_port": "abc"}}}}},
        "config.json": {"service": {"name": "a", "connect": {"proxy": {"config": "str"}}}},
        "command.json": {"service": {"name": "a", "connect": {"proxy": {"command": [1, 2]}}}},
    }
    for name, document in cases.items():
        (tmp_path / name).write_text(json.dumps(document))
        assert run(["convert", str(tmp_path / name)]) == 2, name
        err = capsys.readouterr().err
        assert name in err and "Traceback" not in err
    # JSON with a null in a .hcl file: HCL cannot hold it, so nothing is written.
    nulled = {"service": {"name": "a", "connect": {"proxy": {"config": {"x": None}}}}}
    (tmp_path / "null.hcl").write_text(json.dumps(nulled))
    assert run(["convert", str(tmp_path / "null.hcl")]) == 2
    assert "cannot be written back as HCL unchanged" in capsys.readouterr().err
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    assert run(["convert", str(fifo)]) == 2
    assert "not a regular file" in capsys.readouterr().err


def test_repeated_hcl_blocks_and_any_text_round_trip(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "web.hcl"
    source.write_text(
        'service {\n  name = "web"\n  meta { owner = "José\tR" }\n'
        "  connect { proxy { config { bind_port = 21500 } } }\n"
        '  connect { proxy { upstreams = [{ destination_name = "db", local_bind_port = 9191 }] } }\n}\n'
    )
    assert run(["convert", str(source)]) == 0
    document = parse_text(capsys.readouterr().out, "hcl", "out.hcl")
    sidecar = document["service"]["connect"]["sidecar_service"]
    assert sidecar["port"] == 21500 and sidecar["proxy"]["upstreams"][0]["local_bind_port"] == 9191
    assert document["service"]["meta"]["owner"] == "José\tR"


def test_a_damaged_allocations_file_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "db.json").write_text(json.dumps({"service": DB}))
    (tmp_path / "data" / "proxy").mkdir(parents=True)
    for content in (
        '{"Version": 1, "Proxies": {"db-proxy": {"Port": Infinity, "PortAuto": true}}}',
        "[" * 100000,
    ):
        (tmp_path / "data" / "proxy" / "allocations.json").write_text(content)
        assert run(["convert", "-data-dir", str(tmp_path / "data"), str(tmp_path / "db.json")]) == 2
        err = capsys.readouterr().err
        assert "allocations.json" in err and "Traceback" not in err
