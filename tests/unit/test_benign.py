"""The known-benign warning list (fwpkm_megatron/benign.py) hides what it names and nothing else."""
import logging
import warnings

from fwpkm_megatron import benign


def test_listed_warnings_and_log_lines_are_hidden_and_others_still_show():
    benign.silence()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for entry in benign.WARNINGS:   # catch_warnings reset the filters: install them the way silence() does
            warnings.filterwarnings("ignore", message=entry.message, category=entry.category)
        warnings.warn("Apex is not installed. Falling back to Torch Norm", UserWarning)
        warnings.warn("Warning: tp_group is None, using default tp group. Passing tp_group will be mandatory soon",
                      DeprecationWarning)
        warnings.warn("Apex is not installed", DeprecationWarning)    # listed text, another category
        warnings.warn("a new warning from some library", UserWarning)
    assert [str(w.message) for w in seen] == ["Apex is not installed", "a new warning from some library"]

    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    loggers = [logging.getLogger(name) for name in ("DeepSpeed", "streaming.base.dataset")]
    for logger in loggers:  # a handler of its own: DeepSpeed's logger does not propagate
        logger.addHandler(handler)
    try:
        loggers[0].warning("Setting accelerator to CPU. If you have GPU ...")
        loggers[1].warning("The `replication` arg has been set to 2 and ...")
        loggers[0].warning("ZeRO stage 1 is doing something new")
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    assert [r.getMessage() for r in records] == ["ZeRO stage 1 is doing something new"]
    assert all(entry.why for entry in (*benign.WARNINGS, *benign.LOGS))
