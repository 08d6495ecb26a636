import logging

from megatron_emo import logs


def test_log_once(monkeypatch, caplog):
    monkeypatch.setattr(logs, "_logged_once", set())
    logger = logging.getLogger("megatron_emo.test")
    with caplog.at_level(logging.INFO, logger=logger.name):
        for _ in range(3):
            logs.log_once(logger, "path = %s", "a")
        logs.log_once(logger, "path = %s", "b")
    assert [r.getMessage() for r in caplog.records] == ["path = a", "path = b"]
