"""Makes the speech fixtures of the turn-taking benchmark (bench/turn_taking.py), with espeak-ng: English
and Mandarin, several voices and speaking rates. Writes 16 kHz mono int16 WAVs and an index, fixtures.json, into
bench/fixtures/turn_taking/ (committed; run this again only to change them).

    python bench/make_turn_fixtures.py

Four kinds:
- question: a whole question, said at once;
- paused: a question with a thinking pause (300-1200 ms of silence) in the middle, then more words;
- backchannel: what a listener says or does while the assistant talks, and that is not a turn: "uh-huh", "嗯",
  a cough (a burst of shaped noise), a knock;
- interruption: a real cut-in, a whole sentence.
"""
from __future__ import annotations

import json
import os
import subprocess
import tempfile

import numpy as np
import soundfile as sf
import soxr

SR = 16000
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "turn_taking")

# (espeak-ng voice, words per minute)
VOICES = {"en": [("en-us", 165), ("en-gb", 185), ("en-us+f3", 150), ("en-gb-scotland+m3", 200)],
          "zh": [("cmn", 160), ("cmn+f3", 180), ("cmn+m3", 145), ("cmn+f2", 200)]}

QUESTIONS = {
    "en": ["What is the weather like in Shanghai this weekend?",
           "Can you tell me how long it takes to boil an egg?",
           "Which train should I take to get to the airport?",
           "How do I reset the password on my router?"],
    "zh": ["这个周末上海的天气怎么样？",
           "煮一个鸡蛋需要多长时间？",
           "去机场应该坐哪一趟火车？",
           "我怎么重置路由器的密码？"],
}
# (before the pause, after it): the first part is not a whole question
PAUSED = {
    "en": [("I would like to know", "what the weather is like in Shanghai this weekend."),
           ("Can you tell me, um,", "how long it takes to boil an egg?"),
           ("So the thing is,", "which train goes to the airport from here?"),
           ("How do I", "reset the password on my router?")],
    "zh": [("我想知道", "这个周末上海的天气怎么样。"),
           ("你能告诉我，嗯，", "煮一个鸡蛋需要多长时间吗？"),
           ("就是说，", "去机场应该坐哪一趟火车？"),
           ("我怎么", "重置路由器的密码？")],
}
PAUSES_MS = [300, 600, 900, 1200]
BACKCHANNELS = {"en": ["uh-huh", "yeah", "okay", "mm-hmm"], "zh": ["嗯", "对", "好", "是的"]}
INTERRUPTIONS = {"en": ["Wait, stop, tell me about the trains instead.", "No no, I meant next weekend, not this one."],
                 "zh": ["等一下，我想问的是火车。", "不对，我说的是下个周末。"]}


def say(text: str, voice: str, wpm: int) -> np.ndarray:
    """espeak-ng's speech, resampled to 16 kHz (soxr, sox's resampler), without its leading and trailing silence."""
    with tempfile.TemporaryDirectory() as tmp:
        raw = os.path.join(tmp, "raw.wav")
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(wpm), "-w", raw, text], check=True)
        audio, rate = sf.read(raw, dtype="float32")
    audio = soxr.resample(audio, rate, SR).astype(np.float32)
    loud = np.flatnonzero(np.abs(audio) > 0.005)
    return audio[max(0, loud[0] - SR // 100):loud[-1] + SR // 100]


def cough(seed: int) -> np.ndarray:
    """A cough: two bursts of noise, low-passed, with a fast attack and a slower decay (about 350 ms)."""
    rng = np.random.default_rng(seed)
    out = []
    for length_ms, level in ((150, 0.5), (120, 0.3)):
        n = SR * length_ms // 1000
        noise = np.convolve(rng.standard_normal(n), np.ones(6) / 6, mode="same")
        envelope = np.minimum(1.0, np.arange(n) / (0.01 * SR)) * np.exp(-np.arange(n) / (0.05 * SR))
        out += [level * noise * envelope / np.abs(noise).max(), np.zeros(SR * 40 // 1000)]
    return np.concatenate(out).astype(np.float32)


def knock(seed: int) -> np.ndarray:
    """A knock on the desk: a short damped low tone with a click (about 80 ms)."""
    rng = np.random.default_rng(seed)
    n = SR * 80 // 1000
    t = np.arange(n) / SR
    tone = np.sin(2 * np.pi * 180 * t) * np.exp(-t / 0.015) + 0.3 * rng.standard_normal(n) * np.exp(-t / 0.003)
    return (0.6 * tone / np.abs(tone).max()).astype(np.float32)


def write(name: str, audio: np.ndarray, index: list, **info) -> None:
    sf.write(os.path.join(OUT, name), audio, SR, subtype="PCM_16")
    index.append({"file": name, "seconds": round(len(audio) / SR, 2), **info})


def main() -> None:
    os.makedirs(OUT, exist_ok=True)
    index: list = []
    for lang in ("en", "zh"):
        for i, (voice, wpm) in enumerate(VOICES[lang]):
            write(f"{lang}_question_{i}.wav", say(QUESTIONS[lang][i], voice, wpm), index, kind="question", lang=lang,
                  voice=voice, wpm=wpm, text=QUESTIONS[lang][i])
            before, after = PAUSED[lang][i]
            pause_ms = PAUSES_MS[i]
            audio = np.concatenate([say(before, voice, wpm), np.zeros(SR * pause_ms // 1000, np.float32),
                                    say(after, voice, wpm)])
            write(f"{lang}_paused_{i}.wav", audio, index, kind="paused", lang=lang, voice=voice, wpm=wpm,
                  text=f"{before} ... {after}", pause_ms=pause_ms, pause_at_s=round(len(say(before, voice, wpm)) / SR, 2))
            write(f"{lang}_backchannel_{i}.wav", say(BACKCHANNELS[lang][i], voice, wpm), index, kind="backchannel",
                  lang=lang, voice=voice, wpm=wpm, text=BACKCHANNELS[lang][i])
        for i, text in enumerate(INTERRUPTIONS[lang]):
            voice, wpm = VOICES[lang][i]
            write(f"{lang}_interruption_{i}.wav", say(text, voice, wpm), index, kind="interruption", lang=lang,
                  voice=voice, wpm=wpm, text=text)
    for i in range(2):
        write(f"cough_{i}.wav", cough(i), index, kind="noise", text="(a cough)")
        write(f"knock_{i}.wav", knock(i), index, kind="noise", text="(a knock)")
    with open(os.path.join(OUT, "fixtures.json"), "w", encoding="utf-8") as f:
        json.dump(index, f, ensure_ascii=False, indent=1)
    print(f"{len(index)} fixtures in {OUT}")


if __name__ == "__main__":
    main()
