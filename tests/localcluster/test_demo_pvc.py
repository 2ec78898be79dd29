"""The pure parts of the demo's PVC story: reading the writer pod's reports, and taking
the controller's settings from the chart the demo renders."""

from __future__ import annotations

import pytest

from pairvol.localcluster.demo_pvc import Ack, controller_arg, parse_acks


def test_the_writers_reports_are_read_and_a_line_cut_short_is_skipped() -> None:
    text = "acked 0 1700000000.100 3.5\nacked 1 1700000000.130 12.0\nacked 2 17000"
    assert parse_acks(text) == [Ack(0, 1700000000.1, 3.5), Ack(1, 1700000000.13, 12.0)]


def test_anything_but_a_report_is_not_a_record() -> None:
    assert parse_acks("Traceback (most recent call last):\nacked x 1 2\n\n") == []


def test_the_ready_timeout_is_the_one_the_chart_gives_its_controller() -> None:
    deployment = {
        "spec": {
            "template": {
                "spec": {
                    "containers": [
                        {"name": "csi-provisioner", "args": ["--timeout=60s"]},
                        {"name": "csi-controller", "args": ["csi", "--mode=controller", "--ready-timeout=50"]},
                    ]
                }
            }
        }
    }
    assert controller_arg(deployment, "csi-controller", "--ready-timeout") == "50"
    with pytest.raises(KeyError, match="csi-controller has no --volume-namespace"):
        controller_arg(deployment, "csi-controller", "--volume-namespace")
