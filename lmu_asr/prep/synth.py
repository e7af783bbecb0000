"""The built-in corpus: eSpeak NG speaking sentences from a small grammar, with many voices, rates and pitches.

Nothing is downloaded: ``espeakng-loader`` (PyPI) ships the eSpeak NG library and its data, and we drive it
through ctypes (the system ``libespeak-ng`` is used if the package is missing). A voice is an accent (8 English
ones) plus a variant (dozens: m1-m8, f1-f5, klatt..., named ones), and every utterance also draws its own rate,
pitch and pitch range. DEV and TEST use voices (accent + variant pairs) that never occur in training, so the
built-in corpus measures generalisation to unheard speakers.

The grammar writes numbers, digit strings, dates, times and short commands (a vocabulary of a few hundred
words); transcripts are produced in the model's alphabet, so what eSpeak is asked to say is exactly the target.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from lmu_asr import UserError
from lmu_asr.prep.features import SAMPLE_RATE, resample
from lmu_asr.prep.minicorpus import SourceUtterance
from lmu_asr.text import number_to_words

ACCENTS = ("en-us", "en", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-gb-x-rp", "en-029",
           "en-us-nyc")
VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8", "f1", "f2", "f3", "f4", "f5", "klatt", "klatt2",
            "klatt3", "klatt4", "Alex", "Alicia", "Andrea", "Andy", "Annie", "Denis", "Gene", "Hugo", "Jacky",
            "Lee", "Michael", "Mike", "Reed", "adam", "anika", "aunty", "belinda", "benjamin", "boris", "caleb",
            "david", "ed", "edward", "grandma", "grandpa", "ian", "iven", "iven2", "john", "linda", "max",
            "michel", "norbert", "paul", "quincy", "rob", "robert", "shelby", "steph", "travis", "victor", "zac")
_RATE, _PITCH, _RANGE = 1, 3, 4  # espeak_PARAMETER values
_LOCK = threading.Lock()


class ESpeak:
    """A process-wide eSpeak NG instance (the library is not re-entrant) that returns its float32 output."""

    def __init__(self) -> None:
        path, data = _library()
        self.lib = ctypes.CDLL(path)
        self.lib.espeak_Initialize.restype = ctypes.c_int
        self.rate = self.lib.espeak_Initialize(2, 0, data.encode() if data else None, 0)  # 2: synchronous
        if self.rate <= 0:
            raise UserError("eSpeak NG failed to initialise")
        self._chunks: list[np.ndarray] = []
        callback_type = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)

        def collect(wav, n, _events):  # noqa: ANN001
            if n > 0:
                self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
            return 0

        self._callback = callback_type(collect)  # keep a reference: the C side holds a pointer to it
        self.lib.espeak_SetSynthCallback(self._callback)
        # Voices with breath or Klatt noise (f2, f3, f5, Alicia, victor among ours) draw from eSpeak's own random
        # generator, seeded differently in every process: 155 of the built-in corpus's 1,787 utterances came out
        # different on every run. eSpeak NG >= 1.52 lets us seed it per utterance; older system libraries lack it.
        self._seed = getattr(self.lib, "espeak_ng_SetRandSeed", None)
        if self._seed is not None:
            self._seed.argtypes, self._seed.restype = [ctypes.c_long], None

    def pcm(self, text: str, voice: str, rate: int, pitch: int, pitch_range: int) -> np.ndarray:
        """eSpeak's own output: float32 at ``self.rate`` (22.05 kHz); ``render`` resamples it to 16 kHz."""
        with _LOCK:
            if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
                raise UserError(f"eSpeak NG has no voice {voice!r}")
            self.lib.espeak_SetParameter(_RATE, int(rate), 0)
            self.lib.espeak_SetParameter(_PITCH, int(pitch), 0)
            self.lib.espeak_SetParameter(_RANGE, int(pitch_range), 0)
            self._chunks = []
            data = text.lower().encode()
            if self._seed is not None:  # from what is said and how: no draw from the caller's generator
                self._seed(zlib.crc32(f"{voice}|{rate}|{pitch}|{pitch_range}|".encode() + data))
            self.lib.espeak_Synth(data, len(data) + 1, 0, 0, 0, 0, None, None)
            self.lib.espeak_Synchronize()
            pcm = np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)
        return pcm.astype(np.float32) / 32768.0


def _library() -> tuple[str, str | None]:
    try:
        import espeakng_loader

        return espeakng_loader.get_library_path(), espeakng_loader.get_data_path()
    except ImportError:
        found = ctypes.util.find_library("espeak-ng")
        if found:
            return found, None
    raise UserError("the built-in corpus needs eSpeak NG: pip install espeakng-loader (or apt install espeak-ng)")


@lru_cache(maxsize=1)
def engine() -> ESpeak:
    return ESpeak()


# ---------------------------------------------------------------------------------------------------- grammar
_W = str.split
ROOMS = _W("KITCHEN BEDROOM LIVING ROOM OFFICE GARAGE BATHROOM HALLWAY")
DEVICES = _W("LIGHTS FAN HEATER RADIO TELEVISION OVEN LAMP MUSIC")
NAMES = _W("MOM DAD ANNA PETER SARAH JAMES MARIA DAVID LUCY THOMAS EMMA OLIVER")
CITIES = ("BOSTON", "LONDON", "PARIS", "CHICAGO", "DENVER", "MADRID", "TORONTO", "SEATTLE", "BERLIN", "DUBLIN")
DAYS = _W("MONDAY TUESDAY WEDNESDAY THURSDAY FRIDAY SATURDAY SUNDAY TODAY TOMORROW")
MONTHS = _W("JANUARY FEBRUARY MARCH APRIL MAY JUNE JULY AUGUST SEPTEMBER OCTOBER NOVEMBER DECEMBER")
UNITS = _W("SECONDS MINUTES HOURS DAYS")
TASKS = ("BUY MILK", "CALL THE DOCTOR", "WATER THE PLANTS", "PAY THE BILLS", "FEED THE CAT", "BOOK A TABLE",
         "SEND THE REPORT", "WALK THE DOG", "CLEAN THE GARAGE", "PICK UP THE KIDS")
ORDINALS = ("FIRST SECOND THIRD FOURTH FIFTH SIXTH SEVENTH EIGHTH NINTH TENTH ELEVENTH TWELFTH THIRTEENTH "
            "FOURTEENTH FIFTEENTH SIXTEENTH SEVENTEENTH EIGHTEENTH NINETEENTH TWENTIETH").split()


def ordinal(n: int) -> str:
    """1..39 as an ordinal word ("TWENTY FIRST", "THIRTIETH")."""
    if n <= 20:
        return ORDINALS[n - 1]
    tens, ones = divmod(n, 10)
    word = {2: "TWENTY", 3: "THIRTY"}[tens]
    return word[:-1] + "IETH" if ones == 0 else f"{word} {ORDINALS[ones - 1]}"


def _time(rng: np.random.Generator) -> str:
    hour, minute = int(rng.integers(1, 13)), int(rng.choice([0, 5, 10, 15, 20, 30, 40, 45, 50]))
    spoken = number_to_words(hour) + ("" if minute == 0 else " " + (
        "O " + number_to_words(minute) if minute < 10 else number_to_words(minute)))
    return spoken + str(rng.choice(["", " IN THE MORNING", " IN THE EVENING", " O'CLOCK" if minute == 0 else ""]))


TEMPLATES: list[Callable[[np.random.Generator], str]] = [
    lambda r: f"TURN {r.choice(['ON', 'OFF'])} THE {r.choice(ROOMS)} {r.choice(DEVICES)}",
    lambda r: f"SET A TIMER FOR {number_to_words(int(r.integers(1, 60)))} {r.choice(UNITS)}",
    lambda r: f"CALL {r.choice(NAMES)} AT {_time(r)}",
    lambda r: f"WHAT'S THE WEATHER IN {r.choice(CITIES)} {r.choice(DAYS)}",
    lambda r: f"REMIND ME TO {r.choice(TASKS)} ON {r.choice(DAYS)}",
    lambda r: f"THE MEETING IS ON {r.choice(MONTHS)} {ordinal(int(r.integers(1, 31)))}",
    lambda r: f"I WAS BORN IN NINETEEN {number_to_words(int(r.integers(20, 100)))}",
    lambda r: " ".join(number_to_words(int(d)) for d in r.integers(0, 10, int(r.integers(3, 8)))),
    lambda r: number_to_words(int(r.integers(0, 10_000))),
    lambda r: f"MOVE {r.choice(['LEFT', 'RIGHT', 'FORWARD', 'BACK'])} {number_to_words(int(r.integers(1, 20)))} STEPS",
    lambda r: f"IT'S {_time(r)}",
    lambda r: f"DON'T FORGET THE {r.choice(DEVICES)} IN THE {r.choice(ROOMS)}",
    lambda r: f"ADD {number_to_words(int(r.integers(2, 13)))} {r.choice(['EGGS', 'APPLES', 'BOTTLES', 'BOXES'])} TO THE LIST",
]


def sentence(rng: np.random.Generator) -> str:
    return " ".join(TEMPLATES[int(rng.integers(len(TEMPLATES)))](rng).split())


@dataclass
class SynthSpec:
    """How many utterances per subset; voices for DEV/TEST are held out of training."""

    xs: int = 600
    s: int = 0
    dev: int = 100
    test: int = 150
    held_out_variants: tuple[str, ...] = ("m7", "f4", "klatt3", "Annie", "boris", "linda", "travis", "zac")
    held_out_accents: tuple[str, ...] = ("en-us-nyc",)
    seed: int = 0
    narrowband_hz: int | None = None  # e.g. 8000: pass the audio through that rate (telephone-band speech)


def voices(spec: SynthSpec, held_out: bool) -> list[str]:
    out = []
    for accent in ACCENTS:
        for variant in VARIANTS:
            unseen = accent in spec.held_out_accents or variant in spec.held_out_variants
            if unseen == held_out:
                out.append(f"{accent}+{variant}")
    return out


def render(text: str, voice: str, rng: np.random.Generator, narrowband_hz: int | None = None) -> np.ndarray:
    return _finish(_speak(text, voice, rng), rng, narrowband_hz)


def _speak(text: str, voice: str, rng: np.random.Generator) -> np.ndarray:
    """eSpeak's part of ``render`` (one call at a time, in order: its output depends on call history)."""
    return engine().pcm(text, voice, rate=int(rng.integers(120, 230)), pitch=int(rng.integers(20, 80)),
                        pitch_range=int(rng.integers(20, 90)))


def _finish(pcm: np.ndarray, rng: np.random.Generator, narrowband_hz: int | None) -> np.ndarray:
    """The rest of ``render``: resampling (most of its time; torch releases the GIL), gain and a noise floor.
    ``rng`` is the utterance's own generator, used by nothing else from here on."""
    audio = resample(pcm, engine().rate, SAMPLE_RATE)
    if narrowband_hz:
        audio = resample(resample(audio, SAMPLE_RATE, narrowband_hz), narrowband_hz, SAMPLE_RATE)
    peak = float(np.abs(audio).max()) or 1.0
    gain = float(rng.uniform(0.3, 0.9)) / peak
    return (audio * gain + rng.standard_normal(audio.size).astype(np.float32) * 2e-4).astype(np.float32)


def synthetic_utterances(spec: SynthSpec, texts: Callable[[np.random.Generator], str] = sentence,
                         jobs: int = 2) -> list[SourceUtterance]:
    """The built-in corpus as SourceUtterances (audio in memory), ready for ``build_gigaspeech_corpus``.

    eSpeak runs on this thread, one utterance after another in a fixed order; resampling its output (about 60 % of
    the time) runs on ``jobs`` threads beside it. Each utterance's generator is its own, so the audio is the same
    for any ``jobs``."""
    train_voices, unseen_voices = voices(spec, False), voices(spec, True)
    plan = [("XS", spec.xs, train_voices), ("S", spec.s, train_voices), ("DEV", spec.dev, unseen_voices),
            ("TEST", spec.test, unseen_voices)]
    with ThreadPoolExecutor(max(1, jobs)) as workers:
        todo = list(_planned(spec, texts, plan, workers))
    return [SourceUtterance(uid, speaker, text, subset, audio.result()) for uid, speaker, text, subset, audio in todo]


def _planned(spec: SynthSpec, texts: Callable[[np.random.Generator], str], plan: list[tuple[str, int, list[str]]],
             workers: ThreadPoolExecutor) -> Iterator[tuple[str, str, str, str, Future[np.ndarray]]]:
    for part, (subset, count, pool) in enumerate(plan):
        for i in range(count):
            # one generator per utterance: what is said, by whom and how never depends on earlier audio lengths
            # (eSpeak NG keeps internal state between calls, so its audio varies by a few samples with history)
            rng = np.random.default_rng([spec.seed, part, i])
            voice = str(pool[int(rng.integers(len(pool)))])
            text = texts(rng)
            audio = workers.submit(_finish, _speak(text, voice, rng), rng, spec.narrowband_hz)
            yield f"synth_{subset.lower()}_{i:06d}", voice.replace("+", "_"), text, subset, audio


def check_available() -> None:
    """Raise a one-line UserError when eSpeak NG cannot be used (for the CLI, before any work starts)."""
    engine()
