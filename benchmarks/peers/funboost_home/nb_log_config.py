"""nb_log settings for the funboost peer benchmark (read only inside the scratch virtualenv).

funboost imports nb_log, which looks for a module named ``nb_log_config`` on ``sys.path`` and, when
there is none, copies its own template into ``sys.path[1]``. ``benchmarks/peers/run.py`` puts this
folder first on ``PYTHONPATH`` so that nothing is written into the repository, and sets ``LOG_PATH``
to a temporary folder. The settings below keep nb_log from patching ``print`` and ``sys.stdout`` /
``sys.stderr`` (which would copy every line to a file), from printing its logo and hints, and from
writing root-logger files; the root logger and the default level are WARNING.
"""

import logging
import os

LOG_PATH = os.environ.get("LOG_PATH") or os.path.join(os.environ.get("PEERBENCH_TMP", "/tmp"), "pythonlogs")
SYS_STD_FILE_NAME = None  # do not patch sys.stdout / sys.stderr (they would be copied to a file)
PRINT_WRTIE_FILE_NAME = "peerbench.print"  # (sic) only used by a patched print, which is off below
AUTO_PATCH_PRINT = False
FILTER_WORDS_PRINT: list[str] = []
DEFAULUT_USE_COLOR_HANDLER = False  # (sic)
DEFAULUT_IS_USE_LOGURU_STREAM_HANDLER = False
DISPLAY_BACKGROUD_COLOR_IN_CONSOLE = False
SHOW_PYCHARM_COLOR_SETINGS = False
SHOW_NB_LOG_LOGO = False
SHOW_IMPORT_NB_LOG_CONFIG_PATH = False
DEFAULT_ADD_MULTIPROCESSING_SAFE_ROATING_FILE_HANDLER = False
AUTO_WRITE_ERROR_LEVEL_TO_SEPARATE_FILE = False
LOG_LEVEL_FILTER = logging.WARNING
ROOT_LOGGER_LEVEL = logging.WARNING
ROOT_LOGGER_FILENAME = None
ROOT_LOGGER_FILENAME_ERROR = None
