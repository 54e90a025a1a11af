import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def cuda_device():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    return torch.device("cuda")


@pytest.fixture
def one_thread():
    """The CI box has 2 shared cores: tiny matmuls are fastest (and polite) on one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _restore_logger_levels():
    """A CLI or benchmark ``main()`` run in-process sets logger levels for the whole process (e.g.
    ``rolora_plugin`` at WARNING); put back those of the loggers that existed before the test (a placeholder, i.e.
    a parent no one had configured, goes back to NOTSET) so a later test's ``caplog.at_level(INFO)`` sees our
    records whatever order the tests run in."""
    import logging

    before = dict(logging.Logger.manager.loggerDict)
    levels = {name: log.level if isinstance(log, logging.Logger) else logging.NOTSET for name, log in before.items()}
    root = logging.getLogger().level
    yield
    logging.getLogger().setLevel(root)
    for name, level in levels.items():
        log = logging.Logger.manager.loggerDict.get(name)
        if isinstance(log, logging.Logger) and log.level != level:
            log.setLevel(level)
