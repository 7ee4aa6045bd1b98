"""The final table's `unseen` column: exact match on the tasks a peer's own shard barely holds."""
from deca_p2p.report import eval_table, unseen_accuracy


def test_unseen_is_the_mean_over_tasks_under_five_percent_of_the_shard():
    labels = {"rev": 96, "sort": 4}  # sort is 4% of the shard; add is absent
    m = {"acc": 0.5, "acc/rev": 0.9, "acc/sort": 0.2, "acc/add": 0.4}
    assert unseen_accuracy(labels, m) == (0.2 + 0.4) / 2
    assert unseen_accuracy({"rev": 1, "sort": 1, "add": 1}, m) is None
    assert unseen_accuracy(None, m) is None


def test_table_shows_unseen_only_when_some_peer_has_rare_tasks():
    per_peer = {0: {"eval_loss": 1.0, "acc": 0.5, "acc/a": 1.0, "acc/b": 0.0}}
    t = eval_table(per_peer, labels={0: {"a": 100}})
    assert [c.header for c in t.columns][:4] == ["peer", "eval loss", "acc", "unseen"]
    assert list(t.columns[3].cells)[0] == "0.000"
    t = eval_table(per_peer, labels={0: {"a": 50, "b": 50}})
    assert "unseen" not in [c.header for c in t.columns]
