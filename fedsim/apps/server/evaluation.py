"""Evaluating the global model each round: on the server's test (and validation) set, and on
the clients' local test splits (federated evaluation)."""

from __future__ import annotations

from typing import Any

from flwr.app import ConfigRecord

from fedsim import keys
from fedsim.data import take, validation_split
from fedsim.records import numpy_dict
from fedsim.training import evaluate


class Evaluation:
    """The server's evaluation sets and the round's evaluation metrics."""

    def __init__(self, components, model, spec, device) -> None:
        self.c, self.model, self.spec, self.device = components, model, spec, device
        self.test_set, self.val_set = self._test_sets()

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
        """The round's evaluation fields of metrics.jsonl."""
        out = self._server(arrays)
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

    def _server(self, arrays) -> dict[str, Any]:
        """The global model on the server's sets (None under a personalised strategy: there
        is no global model)."""
        strategy, task = self.c.strategy, self.c.task
        out: dict[str, Any] = {keys.EVAL_LOSS: None, keys.EVAL_ACCURACY: None}
        personal = strategy.personalised
        if not personal:
            strategy.load_global(self.model, self.spec, numpy_dict(arrays))
            res = evaluate(self.model, task, self.test_set, device=self.device)
            out = {keys.EVAL_LOSS: res.loss, keys.EVAL_ACCURACY: res.accuracy}
        if self.val_set is not None:
            out[keys.VAL_LOSS] = out[keys.VAL_ACCURACY] = None
            if not personal:
                res = evaluate(self.model, task, self.val_set, device=self.device)
                out.update({keys.VAL_LOSS: res.loss, keys.VAL_ACCURACY: res.accuracy})
        return out
