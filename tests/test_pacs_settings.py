"""PACS settings and inputs: node addresses, allowed senders, the settings file (and the
``dosepilot pacs node`` command that edits it), study-date ranges."""

from __future__ import annotations

import json

import pytest

from engine.cli import main
from engine.errors import UserError
from engine.pacs.nodes import (
    PacsSettings,
    RemoteNode,
    load_settings,
    parse_node,
    parse_sender,
    save_settings,
    settings_path,
)
from engine.pacs.query import FindQuery, parse_date_range


def test_node_addresses_parse_and_bad_ones_say_how_to_write_them():
    assert parse_node("ORTHANC@pacs.example.org:4242") == RemoteNode(
        "ORTHANC", "pacs.example.org", 4242)
    v6 = parse_node("TPS@[::1]:104")
    assert (v6.host, v6.port, str(v6)) == ("::1", 104, "TPS@[::1]:104")
    for bad in ("ORTHANC", "ORTHANC@host", "@host:4242", "A@h:0", "A@h:70000",
                "THIS_AE_TITLE_IS_TOO_LONG@h:4242", "BACK\\SLASH@h:1"):
        with pytest.raises(UserError):
            parse_node(bad)
    with pytest.raises(UserError, match="AET@HOST:PORT"):
        parse_node("ORTHANC@host")


def test_allowed_senders_with_and_without_host():
    assert str(parse_sender("TPS")) == "TPS"
    sender = parse_sender("TPS@10.0.0.5")
    assert (sender.aet, sender.host) == ("TPS", "10.0.0.5")
    with pytest.raises(UserError):
        parse_sender("@10.0.0.5")


def test_settings_round_trip_and_location(tmp_path, monkeypatch):
    path = tmp_path / "pacs.json"
    assert load_settings(path) == PacsSettings()  # no file: the defaults
    settings = PacsSettings().with_node(parse_node("ORTHANC@127.0.0.1:4242", name="pacs"))
    settings = settings.with_node(RemoteNode("TPS", "tps.local", 104, tls=True, name="tps"))
    save_settings(settings, path)
    again = load_settings(path)
    assert again == settings
    assert again.default_node == "pacs" and again.node() == settings.nodes["pacs"]
    assert again.node("tps").tls
    assert again.without_node("pacs").default_node == "tps"
    monkeypatch.setenv("DOSEPILOT_PACS_SETTINGS", str(path))
    assert settings_path() == path
    monkeypatch.delenv("DOSEPILOT_PACS_SETTINGS")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    assert settings_path() == tmp_path / "cfg" / "dosepilot" / "pacs.json"


@pytest.mark.parametrize("content, message", [
    ("{not json", "cannot read the PACS settings"),
    ('{"nodes": {"x": {"aet": "A", "host": "h"}}}', "lacks 'port'"),
    ('{"default_node": "nope"}', "default_node 'nope' is not one of the nodes"),
    ('{"retrieve_method": "ftp"}', "retrieve_method must be one of"),
    ('{"timeouts": {"dimse": -1}}', "timeout dimse must be a positive"),
    ('{"local": {"aet": ""}}', "local AE title"),
])
def test_a_bad_settings_file_names_itself_and_the_problem(tmp_path, content, message):
    path = tmp_path / "pacs.json"
    path.write_text(content)
    with pytest.raises(UserError, match=message) as info:
        load_settings(path)
    assert str(path) in str(info.value)


def test_unknown_node_name_lists_the_known_ones():
    settings = PacsSettings().with_node(parse_node("A@h:1", name="pacs"))
    with pytest.raises(UserError, match=r"no remote node named 'other'.*known: pacs"):
        settings.node("other")


def test_pacs_node_command_edits_the_settings_file(tmp_path, capsys):
    path = tmp_path / "pacs.json"
    s = ["--settings", str(path)]
    assert main(["pacs", "node", "add", "pacs", "ORTHANC@127.0.0.1:4242", "--default", *s]) == 0
    assert main(["pacs", "node", "add", "tps", "TPS@[::1]:104", "--tls", *s]) == 0
    assert main(["pacs", "node", "local", "--aet", "PLANNER1", "--port", "11113", *s]) == 0
    doc = json.loads(path.read_text())
    assert doc["default_node"] == "pacs"
    assert doc["nodes"]["tps"] == {"aet": "TPS", "host": "::1", "port": 104, "tls": True}
    assert doc["local"] == {"aet": "PLANNER1", "port": 11113}
    capsys.readouterr()
    assert main(["pacs", "node", "list", *s]) == 0
    out = capsys.readouterr().out
    assert "pacs: ORTHANC@127.0.0.1:4242 (default)" in out and "PLANNER1" in out
    assert main(["pacs", "node", "remove", "pacs", *s]) == 0
    assert load_settings(path).default_node == "tps"
    assert main(["pacs", "node", "remove", "pacs", *s]) == 2  # unknown now: a clear error
    assert "no remote node named 'pacs'" in capsys.readouterr().err


def test_the_remote_node_comes_from_options_or_settings(tmp_path, capsys):
    path = tmp_path / "none.json"
    assert main(["pacs", "echo", "--settings", str(path)]) == 2
    err = capsys.readouterr().err
    assert "no remote node: give --host, --port, --called-aet" in err


@pytest.mark.parametrize("text, dicom", [
    ("20240105", "20240105"), ("2024-01-05", "20240105"),
    ("20240101-20240131", "20240101-20240131"), ("2024-01-01..2024-01-31", "20240101-20240131"),
    ("20240101-", "20240101-"), ("-20240131", "-20240131"), ("2024-01-01..", "20240101-"),
    ("", ""),
])
def test_study_date_ranges(text, dicom):
    assert parse_date_range(text) == dicom
    assert FindQuery(study_date=text).study_date == dicom


@pytest.mark.parametrize("text", ["2024-13-01", "yesterday", "20240131-20240101", "-", "2024"])
def test_bad_study_dates_are_user_errors(text):
    with pytest.raises(UserError):
        parse_date_range(text)


def test_query_level_is_checked():
    assert FindQuery(level="series").level == "SERIES"
    with pytest.raises(UserError, match="patient, study, series"):
        FindQuery(level="image")
