"""Text in, token windows out: the default corpus, text sources, calibration and eval windows."""
from .corpus import EVAL_PLAYS, play_ids, shakespeare, strip_markdown
from .text import read_text
from .windows import calibration_windows, check_window_count, eval_windows, tokenize

__all__ = ["EVAL_PLAYS", "play_ids", "shakespeare", "strip_markdown", "read_text", "tokenize",
           "calibration_windows", "check_window_count", "eval_windows"]
