"""Evaluating the global model: on the server's test (and validation) set, and on the clients'
local test splits (federated evaluation), every ``sim.eval_every`` rounds (round 0 and the last
round always), on ``sim.eval_examples`` of the server's test examples between them."""

from __future__ import annotations

from typing import Any

from flwr.app import ConfigRecord

from fedsim import keys
from fedsim.data import eval_subset, take, validation_split
from fedsim.records import numpy_dict
from fedsim.training import evaluate


class Evaluation:
    """The server's evaluation sets and the round's evaluation metrics."""

    def __init__(self, components, model, spec, device) -> None:
        self.c, self.model, self.spec, self.device = components, model, spec, device
        self.test_set, self.val_set = self._test_sets()
        sim = self.c.sim
        self.every, self.rounds = int(sim.get("eval_every", 1)), int(sim["rounds"])
        #: the fixed subset of the test set evaluated between round 0 and the last round
        #: (``sim.eval_examples``), or None: the whole test set every time
        self.subset = eval_subset(self.test_set, sim.get("eval_examples", "all"))

    def due(self, server_round: int) -> bool:
        """Whether ``server_round`` is evaluated: round 0, every ``sim.eval_every``-th round
        and the last round."""
        r = server_round
        return r == 0 or r >= self.rounds or r % self.every == 0

    def _test_sets(self):
        """The server's test set, and the validation split held out of it
        (``sim.validation_fraction``), or None."""
        test = self.c.task.test_set()
        fraction = float(self.c.sim.get("validation_fraction", 0.0))
        if fraction <= 0:
            return test, None
        val, rest = validation_split(len(next(iter(test.values()))), fraction)
        return take(test, rest), take(test, val)

    def metrics(self, server_round: int, arrays, federation, transport, grid) -> dict[str, Any]:
        """The round's evaluation fields of metrics.jsonl (None in a round not evaluated)."""
        if not self.due(server_round):
            return {
                **dict.fromkeys(self._server_keys()),
                "eval_loss_client_mean": None,
                "eval_accuracy_client_mean": None,
                "eval_accuracy_client_min": None,
                "clients_evaluated": 0,
            }
        whole = self.subset is None or server_round == 0 or server_round >= self.rounds
        test = self.test_set if whole else self.subset
        out = self._server(arrays, test)
        if self.subset is not None:
            out["eval_examples"] = len(next(iter(test.values())))
        msgs = list(federation.configure_evaluate(server_round, arrays, ConfigRecord(), grid))
        found = None
        if msgs:
            replies = sorted(transport.exchange(msgs), key=transport.client_of_reply)
            found = federation.aggregate_evaluate(server_round, replies)
        found = dict(found) if found is not None else {}
        out["eval_loss_client_mean"] = found.get("eval_loss_client_mean")
        out["eval_accuracy_client_mean"] = found.get("eval_accuracy_client_mean")
        out["eval_accuracy_client_min"] = found.get("eval_accuracy_client_min")
        out["clients_evaluated"] = int(found.get("clients_evaluated", 0))
        return out

    def _server_keys(self) -> list[str]:
        names = [keys.EVAL_LOSS, keys.EVAL_ACCURACY]
        if self.val_set is not None:
            names += [keys.VAL_LOSS, keys.VAL_ACCURACY]
        return names + (["eval_examples"] if self.subset is not None else [])

    def _server(self, arrays, test_set) -> dict[str, Any]:
        """The global model on the server's sets (None under a personalised strategy: there
        is no global model)."""
        strategy, task = self.c.strategy, self.c.task
        out: dict[str, Any] = {keys.EVAL_LOSS: None, keys.EVAL_ACCURACY: None}
        personal = strategy.personalised
        if not personal:
            strategy.load_global(self.model, self.spec, numpy_dict(arrays))
            res = evaluate(self.model, task, test_set, device=self.device)
            out = {keys.EVAL_LOSS: res.loss, keys.EVAL_ACCURACY: res.accuracy}
        if self.val_set is not None:
            out[keys.VAL_LOSS] = out[keys.VAL_ACCURACY] = None
            if not personal:
                res = evaluate(self.model, task, self.val_set, device=self.device)
                out.update({keys.VAL_LOSS: res.loss, keys.VAL_ACCURACY: res.accuracy})
        return out
