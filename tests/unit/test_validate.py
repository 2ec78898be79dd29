# ruff: noqa: RUF001  (look-alike Unicode digits and letters are the point of these inputs)
"""The agent's one validation layer (pairvol.agent.validate), shared by its flags and its
API bodies: every malformed value is an InvalidInput with a reason — never a ValueError,
RecursionError or a value that slips through — and the fuzzer's judges really judge."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from tests.support import fuzz

from pairvol.agent import validate as v
from pairvol.agent.config import AgentConfig


class TestNumbers:
    @pytest.mark.parametrize("port", ["²", "¹²", "٨٠", "８０", "9" * 5000, "0" * 6 + "80", "+80", " 80", "80 ", "0x50"])
    def test_ports_are_ascii_digits_within_bounds(self, port: str) -> None:
        with pytest.raises(v.InvalidInput, match="invalid port"):
            v.parse_hostport(f"127.0.0.1:{port}", "--listen")

    def test_a_5000_digit_port_is_not_echoed_in_full(self) -> None:
        with pytest.raises(v.InvalidInput) as err:
            v.parse_hostport("h:" + "9" * 5000, "peer")
        assert len(str(err.value)) < 300

    @pytest.mark.parametrize(
        "text", ["nan", "NaN", "inf", "-inf", "Infinity", "1e3", "-1", "0.5", "601", "", "5s", "٥"]
    )
    def test_seconds_are_finite_plain_decimals_in_range(self, text: str) -> None:
        with pytest.raises(v.InvalidInput, match="--peer-timeout"):
            v.parse_seconds(text, "--peer-timeout", 1, 600)

    @pytest.mark.parametrize(("text", "seconds"), [("1", 1.0), ("5", 5.0), ("2.5", 2.5), ("600", 600.0)])
    def test_seconds(self, text: str, seconds: float) -> None:
        assert v.parse_seconds(text, "--peer-timeout", 1, 600) == seconds

    @pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
    def test_a_config_with_a_non_finite_peer_timeout_is_refused_too(self, value: float) -> None:
        cfg = AgentConfig(
            "v", Path("/d"), 1 << 20, ("127.0.0.1", 1), ("127.0.0.1", 2), Path("/d/s"), peer_timeout=value
        )
        with pytest.raises(v.InvalidInput, match="--peer-timeout"):
            cfg.check()

    @pytest.mark.parametrize("size", ["١٦Mi", "１６Mi", "9" * 5000, "1e3", "1.5Ki", "-1", "0", "16Mi\n"])
    def test_sizes_are_ascii_digits_with_a_binary_suffix(self, size: str) -> None:
        with pytest.raises(v.InvalidInput, match="size"):
            v.parse_size(size)

    @given(st.text(max_size=40))
    def test_any_text_is_a_port_in_range_or_refused(self, text: str) -> None:
        try:
            host, port = v.parse_hostport(f"h:{text}")
        except v.InvalidInput:
            return
        assert host == "h" and 1 <= port <= 65535 and text.isascii() and text.isdigit()

    @given(st.text(max_size=40))
    def test_any_text_is_finite_seconds_in_range_or_refused(self, text: str) -> None:
        try:
            seconds = v.parse_seconds(text, "--x", 1, 600)
        except v.InvalidInput:
            return
        assert math.isfinite(seconds) and 1 <= seconds <= 600


class TestNamesAndAddresses:
    @pytest.mark.parametrize("name", ["vol\n", "vol ", "völ", "٣"])
    def test_names_match_in_full(self, name: str) -> None:
        with pytest.raises(v.InvalidInput, match="invalid volume name"):
            v.parse_name(name)

    @pytest.mark.parametrize(
        ("text", "want"),
        [
            ("[::1]:80", ("::1", 80)),
            ("[2001:DB8::1]:7801", ("2001:db8::1", 7801)),
            ("10.0.0.1:1", ("10.0.0.1", 1)),
            ("node-a.svc.cluster.local:65535", ("node-a.svc.cluster.local", 65535)),
        ],
    )
    def test_host_forms(self, text: str, want: tuple[str, int]) -> None:
        assert v.parse_hostport(text) == want
        assert v.format_hostport(*want) == (text if "DB8" not in text else "[2001:db8::1]:7801")

    @pytest.mark.parametrize(
        ("text", "reason"),
        [
            ("::1:80", "brackets"),
            ("[::1:80", "IPv6"),
            ("[fe80::1%eth0]:80", "zone"),
            ("[1.2.3.4]:80", "IPv6"),
            ("h\n:80", "invalid host"),
            ("a\x00b:80", "invalid host"),
            ("999.1.1.1:80", "invalid host"),
            ("a" * 64 + ":80", "invalid host"),
            ((("a" * 63 + ".") * 5) + "a:80", "invalid host"),
            (" :80", "invalid host"),
        ],
    )
    def test_bad_hosts(self, text: str, reason: str) -> None:
        with pytest.raises(v.InvalidInput, match=reason):
            v.parse_hostport(text, "peer")

    @pytest.mark.parametrize("mode", ["chec\u212apoint", "lat\u0435st", "ｌａｔｅｓｔ", "latest "])
    def test_failover_modes_are_ascii(self, mode: str) -> None:
        with pytest.raises(v.InvalidInput, match="invalid failover mode"):
            v.parse_mode({"mode": mode})

    @pytest.mark.parametrize("path", ["", "a\x00b", "/x/" + "y" * 256, "/" + "z/" * 2100])
    def test_paths_the_kernel_cannot_take(self, path: str) -> None:
        with pytest.raises(v.InvalidInput, match="--data-dir"):
            v.parse_path(path, "--data-dir")

    @pytest.mark.parametrize(
        ("data", "reason"),
        [
            (b"", "shorter"),
            (b"short\n", "shorter"),
            (b"a token with spaces", "visible ASCII"),
            ("tökentökentökentöken".encode(), "visible ASCII"),
            (b"\xff" * 20, "visible ASCII"),
            (b"a" * 5000, "longer"),
        ],
    )
    def test_tokens(self, data: bytes, reason: str) -> None:
        with pytest.raises(v.InvalidInput, match=reason):
            v.parse_token(data, "--token-file f")
        assert v.parse_token(b"  0123456789abcdef\n", "f") == "0123456789abcdef"


class TestJsonBodies:
    def test_deep_nesting_is_refused_without_recursing(self) -> None:
        for body in (b"[" * 5000 + b"]" * 5000, b'{"epoch": ' + b"[" * 40_000 + b"]" * 40_000 + b"}"):
            with pytest.raises(v.InvalidInput, match="nested deeper than 32"):
                v.parse_json_body(body)

    def test_brackets_inside_strings_do_not_count(self) -> None:
        assert v.parse_json_body(b'{"peer": "' + b"[" * 100 + b'"}') == {"peer": "[" * 100}

    @pytest.mark.parametrize(
        ("raw", "reason"),
        [
            (b'{"epoch": 1, "epoch": 2}', "twice"),
            (b'{"epoch": NaN}', "not JSON"),
            (b'{"epoch": -Infinity}', "not JSON"),
            (b'{"epoch": ' + b"9" * 5000 + b"}", "5000 digits"),
            (b'{"epoch": 1e400}', "out of range"),
            (b'{"x": "\xff"}', "not UTF-8"),
            (b"\xef\xbb\xbf{}", "not valid JSON"),
            (b"[1]", "must be a JSON object"),
            (b"null", "must be a JSON object"),
            (b"{} x", "not valid JSON"),
        ],
    )
    def test_bodies(self, raw: bytes, reason: str) -> None:
        with pytest.raises(v.InvalidInput, match=reason):
            v.parse_json_body(raw)

    def test_empty_body_is_no_fields(self) -> None:
        assert v.parse_json_body(b"") == {} and v.parse_json_body(b" \r\n") == {}

    @given(st.binary(max_size=200))
    def test_any_bytes_are_an_object_or_refused(self, raw: bytes) -> None:
        try:
            body = v.parse_json_body(raw)
        except v.InvalidInput:
            return
        assert isinstance(body, dict)

    @given(
        st.recursive(
            st.none() | st.integers() | st.text(max_size=5),
            lambda c: st.lists(c) | st.dictionaries(st.text(max_size=3), c),
        )
    )
    def test_any_json_value_is_an_object_or_refused(self, value: object) -> None:
        try:
            body = v.parse_json_body(json.dumps(value).encode())
        except v.InvalidInput:
            return
        assert body == value


class TestFuzzerJudges:
    """The fuzzer would be worthless if its judges passed everything."""

    def test_http_judge(self) -> None:
        case = fuzz.HttpCase("POST", "/v1/primary", (), b"{}", 400, "x")
        ok = fuzz.HttpAnswer(400, b'{"error": "missing epoch"}')
        assert fuzz.judge_http(case, ok) is None
        for answer in (
            fuzz.HttpAnswer(500, b'{"error": "boom"}'),
            fuzz.HttpAnswer(200, b"{}"),
            fuzz.HttpAnswer(409, b'{"error": "stale epoch"}'),
            fuzz.HttpAnswer(400, b"400: Bad Request"),
            fuzz.HttpAnswer(400, b'{"error": ""}'),
            fuzz.HttpAnswer(400, b'{"error": "Traceback (most recent call last):\\n"}'),
        ):
            assert fuzz.judge_http(case, answer) is not None, answer

    def test_cli_judge(self) -> None:
        case = fuzz.CliCase(("agent",), "peer-timeout", "x")
        assert fuzz.judge_cli(case, 2, "pairvol agent: invalid --peer-timeout 'nan': ...\n", False) is None
        assert fuzz.judge_cli(case, 2, "usage: ...\npairvol agent: error: --peer-timeout\n", False) is not None
        assert fuzz.judge_cli(case, 1, "pairvol agent: --peer-timeout\n", False) is not None
        assert fuzz.judge_cli(case, 2, "pairvol agent: invalid size\n", False) is not None
        assert fuzz.judge_cli(case, 0, "", True) is not None

    def test_cases_are_a_function_of_seed_and_index(self, tmp_path: Path) -> None:
        assert fuzz.http_case(3, 17, token="t" * 16) == fuzz.http_case(3, 17, token="t" * 16)
        assert fuzz.cli_case(3, 17, tmp_path) == fuzz.cli_case(3, 17, tmp_path)
        assert len({fuzz.http_case(3, i).describe() for i in range(50)}) > 40

    def test_the_cli_fuzzer_finds_a_check_that_lets_nan_through(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(v, "parse_seconds", lambda value, *_: float(value))  # the old float() flag type
        found = fuzz.fuzz_cli(rounds=200, seed=5)
        assert any("would start" in x.why and "-duration" in x.input for x in found), found

    def test_the_cli_fuzzer_finds_nothing_in_the_real_checks(self) -> None:
        assert fuzz.fuzz_cli(rounds=300, seed=11) == []
