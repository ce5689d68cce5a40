"""The core's extension points: the uplink chain as the config builds it, the config registry
and the hints it feeds, and what an older fedsim's strategies, adapters and checkpoints get."""

from __future__ import annotations

import sys
import textwrap

import numpy as np
import pytest

from fedsim.errors import ConfigError
from tests.conftest import tiny


def components(*extra: str):
    from fedsim.build import build_components
    from fedsim.config import compose

    return build_components(compose(tiny(*extra))[0])


def chain(*extra: str) -> list[str]:
    c = components(*extra)
    return c.uplink(c.model()[1]).names


@pytest.mark.parametrize(
    "extra, stages",
    [
        ((), []),
        (("strategy=fedsb", "adapter=lora_sb"), ["frozen"]),
        (("strategy=fedsb", "adapter=lora_sb", "adapter.init.method=random"), []),
        (("compressor=topk",), ["compression"]),
        (("feedback=ef21",), ["compression"]),  # EF21's memories change what travels
        (("privacy=central",), ["central_dp"]),
        (("privacy=dpsgd",), []),  # client DP-SGD is training, not a stage
        (
            (
                "strategy=fedsb",
                "adapter=lora_sb",
                "downlink=topk",
                "compressor=topk",
                "feedback=ef21",
                "privacy=central",
                "faults=mixed",
            ),
            ["frozen", "downlink", "compression", "central_dp", "faults"],
        ),
    ],
)
def test_the_chain_holds_the_stages_that_are_on_in_one_order(extra, stages):
    assert chain(*extra) == stages


def test_a_naive_feedback_by_another_name_compresses_nothing(tmp_path, monkeypatch):
    (tmp_path / "myfeedback.py").write_text(
        "from fedsim.feedback import Naive\n\nclass Plain(Naive):\n    name = 'plain'\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    c = components("feedback._target_=myfeedback.Plain")
    assert not c.compresses and "compression" not in c.uplink(c.model()[1]).names


def test_hints_list_the_options_whose_class_qualifies():
    from fedsim import registry
    from fedsim.config import check, compose

    averaging = [
        o for o in registry.options("strategy") if registry.option_class("strategy", o).averages
    ]
    assert averaging == ["fedavg", "fedsa", "fedsb", "ffa", "rolora"]
    with pytest.raises(ConfigError, match="use fedavg, fedsa, fedsb or ffa"):
        check(compose(tiny("strategy=fedex", "feedback=ef21"))[0])
    with pytest.raises(ConfigError, match=r"use cast, topk, or randk with scaled=false\)"):
        check(compose(tiny("compressor=qsgd", "feedback=ef14"))[0])
    with pytest.raises(ConfigError, match="use fedavg, fedsb, ffa or rolora"):
        check(compose(tiny("strategy=fedsa", "privacy=central"))[0])


def _user_module(tmp_path, monkeypatch, name: str, source: str) -> None:
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop(name, None)


def test_a_strategy_overriding_a_hook_fedsim_no_longer_calls_is_refused(tmp_path, monkeypatch):
    _user_module(
        tmp_path,
        monkeypatch,
        "oldstrategy",
        """
        from strategies.fedavg import FedAvg

        class Mine(FedAvg):
            def aggregation_error(self, current, new, updates):
                return 0.0
        """,
    )
    with pytest.raises(ConfigError, match=r"Mine defines aggregation_error\(\), which fedsim"):
        components("strategy._target_=oldstrategy.Mine")


def test_an_adapter_speaking_the_old_init_protocol_is_refused(tmp_path, monkeypatch):
    _user_module(
        tmp_path,
        monkeypatch,
        "oldadapter",
        """
        from fedsim.adapters import LoRA

        class Mine(LoRA):
            @property
            def needs_data_init(self):
                return True
        """,
    )
    with pytest.raises(ConfigError, match="data_init"):
        components("adapter._target_=oldadapter.Mine")


def test_a_format_1_tree_is_upgraded_whatever_its_strategy_saved():
    from fedsim.apps.server.state import FORMAT, upgrade

    w = np.ones(3)
    old = {
        "format": 1,
        "round": 2,
        "strategy": {
            "frozen": {"a": w},
            "has_frozen": [0, 2],
            "absorbed": {1: 2},
            "initial_personal": {},
        },
        "feedback": {"g/x": w},
        "downlink": None,
        "central": [[1.0, 0.5, 2]],
    }
    new = upgrade(old, ["frozen", "compression", "central_dp"])
    assert new["format"] == FORMAT and "feedback" not in new and "central" not in new
    assert new["strategy"] == {"initial_personal": {}, "has_initial": [0, 2]}
    assert new["uplink"]["frozen"]["has_frozen"] == [0, 2]
    assert new["uplink"]["compression"]["absorbed"] == {1: 2}
    assert new["uplink"]["central_dp"] == [[1.0, 0.5, 2]]
    # a strategy whose state_dict did not extend fedsim's saved none of its keys
    bare = upgrade({**old, "strategy": {"calls": 3}, "feedback": None, "central": None}, [])
    assert bare["strategy"] == {"calls": 3} and bare["uplink"] == {}
