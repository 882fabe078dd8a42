"""Report-quality scores: BLEU-1..4, METEOR, ROUGE-L and CIDEr, computed as R2Gen computes them.

This file owns scoring generated reports against ground-truth reports. It reproduces the published
R2Gen evaluation (zhjohnchan/R2Gen modules/metrics.py): the pycocoevalcap scorers `Bleu(4)`,
`Meteor()` and `Rouge()` are called with `compute_score(gts, res, verbose=0)` (or without
`verbose` where the scorer does not take it) on `gts = {i: [ground_truth]}`, `res = {i: [generated]}`;
CIDEr (`Cider()`) is added. Texts are expected already cleaned and tokenised, space separated and
lower-cased, as the tokenizer's `decode` gives them; no further tokenisation is applied.

What pycocoevalcap 1.2 does that the code below has to live with:
- BLEU is corpus-level (n-gram counts and lengths are summed over the corpus before the ratio and
  the brevity penalty are taken) with smoothing `(correct + 1e-15) / (guess + 1e-9)`; with its
  default `verbose=1` it prints the counts to stdout.
- ROUGE-L splits on single spaces (`split(" ")`) and averages a per-report LCS F-measure (beta 1.2).
- CIDEr is CIDEr-D style (clipped tf-idf, Gaussian length penalty, x10) with the idf taken over the
  references of the corpus being scored: a one-report corpus, or an n-gram found in every
  reference, gets idf 0, so CIDEr of a single pair is 0 whatever the texts. It crashes
  (`max()` of an empty sequence) when no reference has any token.
- METEOR runs `java -jar meteor-1.5.jar` as a subprocess per `Meteor()` instance (here: one per
  process, kept between evaluations) and talks to it
  line by line (`SCORE ||| ref ||| hyp`, then `EVAL ||| ...`). A newline (or carriage return) in
  any text desynchronises that protocol, and `|||` in a reference splits it into two references.
  The first call pays the JVM start and the paraphrase-table load (about 9 s on 2 cores).
  1.2 has no `close()`; its `__del__` kills the process, but takes a lock that `compute_score` leaves
  held when it raises, so after a failure it deadlocks, and it raises AttributeError when `java`
  could not be started at all.
- Empty hypotheses do not crash any scorer and score 0 in all of them, so they are passed through
  unchanged: a placeholder token would add to BLEU's corpus-level test length and n-gram guesses
  and so change every other report's score.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import io
import shutil
import subprocess
import threading
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge

SCORE_KEYS: tuple[str, ...] = ("BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "METEOR", "ROUGE_L", "CIDEr")

JAVA_CHECK_TIMEOUT_S = 20.0
"""`java -version` limit; a JVM that cannot print its version in this time is treated as absent."""

METEOR_TIMEOUT_S = 600.0
"""Limit on one METEOR evaluation. 3,000 reports of 60 words take about 17 s on 2 cores, start
included; past this limit the JVM is taken to be hung and is killed, so an evaluation in a training
run cannot block forever."""


class MeteorUnavailableWarning(RuntimeWarning):
    """METEOR cannot be computed in this process (no working `java`); it is reported as None."""


class _MeteorState:
    # Process-wide, because the warning is given once per process and a JVM that failed once is not
    # started again (a hung one would otherwise cost METEOR_TIMEOUT_S at every evaluation). The JVM
    # itself is kept for the process's later evaluations: starting it and loading the paraphrase
    # table costs about 9 s, three times per evaluated epoch (val, test, baseline) otherwise.
    # METEOR scores each segment on its own, so a reused JVM gives the scores a fresh one gives.
    lock = threading.Lock()
    warned = False
    broken: str | None = None
    jvm_lock = threading.Lock()   # one evaluation at a time talks to the JVM
    scorer: "_ClosableMeteor | None" = None


def close_meteor() -> None:
    """Stop the kept METEOR JVM (at exit; the next evaluation starts a new one)."""
    with _MeteorState.jvm_lock:
        if _MeteorState.scorer is not None:
            _MeteorState.scorer.close()
            _MeteorState.scorer = None


@functools.cache
def java_available() -> bool:
    """Whether a `java` on PATH runs `java -version` successfully (checked once per process)."""
    java = shutil.which("java")
    if java is None:
        return False
    try:
        done = subprocess.run([java, "-version"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, timeout=JAVA_CHECK_TIMEOUT_S, check=False)
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


class _ClosableMeteor(Meteor):
    """pycocoevalcap's Meteor with an explicit, idempotent `close()`.

    The scoring (`compute_score`) is inherited untouched; only the process lifetime changes, because
    the parent's `__del__` can deadlock or raise (see the module docstring) and leaves reaping the
    JVM to the garbage collector.
    """

    def close(self) -> str:
        """Kill and reap the JVM, close its pipes; returns the tail of its stderr (for diagnostics)."""
        proc: subprocess.Popen[bytes] | None = self.__dict__.pop("meteor_p", None)
        if proc is None:
            return ""
        if proc.poll() is None:
            proc.kill()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        err = b""
        if proc.returncode is not None and proc.stderr is not None:
            # The JVM is gone, so its end of the pipe is closed and this read ends at EOF.
            with contextlib.suppress(OSError, ValueError):
                err = proc.stderr.read()
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                with contextlib.suppress(OSError, ValueError):  # BrokenPipeError on stdin's flush
                    stream.close()
        return err.decode(errors="replace").strip()[-500:]

    def __del__(self) -> None:
        self.close()


def _sanitize(text: str) -> str:
    # METEOR's line protocol breaks on line ends and `|||`; every scorer gets the same text so the
    # metrics stay comparable. Text from the tokenizer's decode contains none of these, so for it
    # this is the identity and the scores are the published ones.
    return text.replace("\r", " ").replace("\n", " ").replace("|||", " ")


def _call(scorer: Any, gts: dict[int, list[str]], res: dict[int, list[str]]) -> Any:
    # As R2Gen: `verbose=0` where the scorer takes it (Bleu), the plain call otherwise.
    try:
        score, _ = scorer.compute_score(gts, res, verbose=0)
    except TypeError:
        score, _ = scorer.compute_score(gts, res)
    return score


def _quiet(fn: Callable[[], Any]) -> Any:
    # Keeps stdout clean even if a scorer prints regardless of `verbose`. Only the pure-Python
    # scorers are wrapped: they finish in well under a second, so other threads' output is hidden
    # for no longer than that (METEOR talks to its JVM over pipes and prints nothing).
    with contextlib.redirect_stdout(io.StringIO()):
        return fn()


def _meteor_unavailable(reason: str) -> None:
    with _MeteorState.lock:
        if _MeteorState.warned:
            return
        _MeteorState.warned = True
    warnings.warn(f"METEOR unavailable, reported as None: {reason}", MeteorUnavailableWarning, stacklevel=4)


def _meteor(gts: dict[int, list[str]], res: dict[int, list[str]]) -> float | None:
    if _MeteorState.broken is not None:
        return None
    if not java_available():
        _meteor_unavailable("no working `java` on PATH (install a Java runtime, 8 or newer)")
        return None
    scorer: _ClosableMeteor | None = None
    watchdog: threading.Timer | None = None
    timed_out = threading.Event()

    def kill_hung_jvm(proc: subprocess.Popen[bytes]) -> None:
        # Killing the JVM makes the blocked readline in compute_score return EOF, which fails its
        # float() parse and lands in the except branch below.
        timed_out.set()
        proc.kill()

    with _MeteorState.jvm_lock:
        try:
            if _MeteorState.scorer is None:
                _MeteorState.scorer = _ClosableMeteor()
                atexit.register(close_meteor)
            scorer = _MeteorState.scorer
            watchdog = threading.Timer(METEOR_TIMEOUT_S, kill_hung_jvm, args=(scorer.meteor_p,))
            watchdog.daemon = True
            watchdog.start()
            return float(_call(scorer, gts, res))
        except Exception as exc:  # noqa: BLE001 - a broken JVM must cost METEOR only, not the run.
            stderr = scorer.close() if scorer is not None else ""
            _MeteorState.scorer = None
            if timed_out.is_set():
                reason = f"the METEOR subprocess took longer than {METEOR_TIMEOUT_S:g} s and was killed"
            else:
                reason = f"the METEOR subprocess failed ({exc!r})" + (f"; java said: {stderr}" if stderr else "")
            _MeteorState.broken = reason
            _meteor_unavailable(reason + "; METEOR is off for the rest of this process")
            return None
        finally:
            if watchdog is not None:
                watchdog.cancel()


def _cider(gts: dict[int, list[str]], res: dict[int, list[str]]) -> float:
    if not any(ref.split() for refs in gts.values() for ref in refs):
        # pycocoevalcap crashes on an empty document-frequency table; with no reference n-grams
        # every similarity is 0, which is what the formula gives.
        return 0.0
    return float(_call(Cider(), gts, res))


def compute_scores(ground_truths: Sequence[str], generated: Sequence[str]) -> dict[str, float | None]:
    """Corpus scores of `generated` against `ground_truths` (pairwise), keyed by SCORE_KEYS.

    METEOR is None (with one MeteorUnavailableWarning per process) when Java is missing or broken.
    """
    if isinstance(ground_truths, str) or isinstance(generated, str):
        raise TypeError("ground_truths and generated must be sequences of strings, not a single string")
    if len(ground_truths) != len(generated):
        raise ValueError(f"ground_truths and generated differ in length: "
                         f"{len(ground_truths)} references vs {len(generated)} generated reports")
    if len(generated) == 0:
        raise ValueError("no reports to score: ground_truths and generated are empty")
    for name, texts in (("ground_truths", ground_truths), ("generated", generated)):
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"{name}[{i}] is {type(text).__name__}, not str")
    gts = {i: [_sanitize(t)] for i, t in enumerate(ground_truths)}
    res = {i: [_sanitize(t)] for i, t in enumerate(generated)}

    bleu = _quiet(lambda: _call(Bleu(4), gts, res))
    scores: dict[str, float | None] = {f"BLEU_{n}": float(bleu[n - 1]) for n in range(1, 5)}
    scores["METEOR"] = _meteor(gts, res)
    scores["ROUGE_L"] = float(_quiet(lambda: _call(Rouge(), gts, res)))
    scores["CIDEr"] = float(_quiet(lambda: _cider(gts, res)))
    return {key: scores[key] for key in SCORE_KEYS}
