"""The demo's ``report.md``, its closing screen, and the error analysis both show.

The analysis answers what a user asks after the WER: which voices fail, and how. Test hypotheses are keyed by
the corpus's segment ids (``AUD..._S...``); ``GigaSpeech.json`` maps them back to the user's own utterance ids
and speakers, so the report speaks the user's names. Word errors are counted from a minimum-edit alignment
(``text.align_words``, GigaSpeech scoring as for the WER), so the confusion counts add up to the word errors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmu_asr.text import TOP_CONFUSIONS, confusion_line, rates_by_group, word_confusions


def segment_info(corpus: Path) -> dict[str, dict[str, str]]:
    """Segment id -> {"speaker", "utterance"} from a corpus's GigaSpeech.json (the utterance: the source id the
    segment was built from, or the segment id itself)."""
    audios = json.loads((corpus / "GigaSpeech.json").read_text())["audios"]
    return {seg["sid"]: {"speaker": str(seg.get("speaker", "?")), "utterance": seg.get("source_utt", seg["sid"])}
            for audio in audios for seg in audio["segments"]}


def error_analysis(decoder: str, hypotheses: list[tuple[str, str, str]],
                   segments: dict[str, dict[str, str]]) -> dict[str, Any]:
    """WER per test speaker and the most frequent word errors of one decoder's (key, reference, hypothesis)."""
    confusions = word_confusions((ref, hyp) for _, ref, hyp in hypotheses)
    return {"decoder": decoder, "word_errors": sum(int(c["count"]) for c in confusions),
            "per_speaker": rates_by_group(hypotheses, {k: v["speaker"] for k, v in segments.items()}),
            "confusions": confusions[:TOP_CONFUSIONS]}


def best_scored(results: dict[str, Any]) -> str:
    """The decoder with the lowest test WER among those that kept their hypotheses."""
    kept = [k for k, v in results.items() if v.get("hypotheses")]
    return min(kept or results, key=lambda k: results[k]["wer"])


def report_markdown(s: dict[str, Any], results: dict[str, Any], segments: dict[str, dict[str, str]]) -> str:
    a = s["analysis"]
    best = a["decoder"]
    errors = [h for h in results[best].get("hypotheses", []) if h[1] != h[2]][:10]
    lm = s.get("lm")
    word = lambda w: w or "(none)"  # noqa: E731
    lines = [
        "# lmu-asr demo report", "",
        f"Corpus: {s['corpus']}" + (f"; test speakers: {', '.join(s['test_speakers'])}" if s["test_speakers"]
                                    else f"; test pattern: {s['test_pattern']}" if s["test_pattern"] else ""),
        f"Model: preset `{s['preset']}`, {s['parameters']:,} parameters, {s['epochs']} epochs "
        f"({s['train']['step']} steps, {s['seconds']['train']:.0f} s on this CPU).", "",
        "| decoder (held-out test) | WER | CER | utterances |", "|---|---|---|---|",
        *[f"| {k} | {100 * v['wer']:.2f} % | {100 * v['cer']:.2f} % | {v['utterances']} |"
          for k, v in s["test"].items()], "",
        (f"The word LM: a 3-gram (Kneser-Ney) of the training transcripts and their lexicon; LM weight "
         f"{lm['options']['lm_weight']:g} and word score {lm['options']['word_score']:g} chosen on DEV "
         f"(WER {100 * lm['dev_wer']:.2f} % there), never on TEST." if lm else "No word LM (--no-lm)."), "",
        *([f"Rows `+adapt`: the model adapted to the test voices by `lmuasr adapt` in {s['adapt']['seconds']:.0f} s, "
           f"from their audio alone: {len(s['adapt']['kept'])} rounds of decoding them ({s['adapt']['decoder']}), "
           f"keeping the most confident {100 * s['adapt']['options']['keep']:.0f} % of the hypotheses and "
           "fine-tuning on those and on training utterances; TEST's transcripts are never read. The rows without "
           f"`+adapt` are the trained model's. Adapted checkpoint: `{s['adapt']['checkpoint']}`.", ""]
          if s.get("adapt") and "skipped" not in s["adapt"] else []),
        *([f"Adaptation to the test voices was skipped: {s['adapt']['skipped']}.", ""]
          if s.get("adapt") and "skipped" in s["adapt"] else []),
        f"Training throughput (bench, batch {s['bench']['batch']} x {s['bench']['frames']} frames, "
        f"{s['bench']['device']}): {s['bench']['utt_per_s']:.0f} utt/s, {s['bench']['audio_s_per_s']:.0f} "
        f"audio-s/s, peak memory {s['bench'].get('max_allocated_gb') or s['bench']['max_rss_gb']:.2f} GB.", "",
        "![training curves](run/curves.png)", "", "## Sample transcriptions", "",
        "| file | reference | hypothesis |", "|---|---|---|",
        *[f"| {Path(t['file']).name} | {t['reference']} | {t['hypothesis']} |" for t in s["transcripts"]], "",
        f"## Test WER by speaker ({best})", "", "| speaker | WER | words | utterances |", "|---|---|---|---|",
        *[f"| {spk} | {100 * v['wer']:.2f} % | {v['ref_words']} | {v['utterances']} |"
          for spk, v in a["per_speaker"].items()], "",
        f"## Most frequent word errors ({best}; {a['word_errors']} in all)", "",
        "| reference | hypothesis | count |", "|---|---|---|",
        *[f"| {word(c['reference'])} | {word(c['hypothesis'])} | {c['count']} |" for c in a["confusions"]], "",
        f"## Some test errors ({best})", "", "| utterance | speaker | reference | hypothesis |", "|---|---|---|---|",
        *[f"| {segments.get(k, {}).get('utterance', k)} | {segments.get(k, {}).get('speaker', '?')} | {r} | {h} |"
          for k, r, h in errors], "",
        "## Time (s)", "", "| stage | seconds |", "|---|---|",
        *[f"| {k} | {v:.1f} |" for k, v in s["seconds"].items()], ""]
    return "\n".join(lines)


def summary_screen(s: dict[str, Any]) -> str:
    a = s.get("analysis") or {}
    top = confusion_line(a.get("confusions", []))
    return "\n".join([
        "", "== lmu-asr demo: done",
        "   test WER " + ", ".join(f"{100 * v['wer']:.2f} % {k}" for k, v in s["test"].items())
        + f" ({s['test']['greedy']['utterances']} held-out utterances)",
        *([f"   most frequent word errors ({a['decoder']}): {top}"] if top else []),
        f"   training: {s['train']['step']} steps in {s['seconds']['train']:.0f} s; bench "
        f"{s['bench']['utt_per_s']:.0f} utt/s, {s['bench']['audio_s_per_s']:.0f} audio-s/s on {s['bench']['device']}",
        f"   model: {s['checkpoint']}", f"   report: {Path(s['curves']).parent.parent / 'report.md'}",
        f"   total {s['seconds']['total']:.0f} s"])
