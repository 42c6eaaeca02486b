"""TEST STAND-IN for `cosyvoice.cli.cosyvoice` from the official CosyVoice repo (github FunAudioLLM/CosyVoice).
It is NOT the PyPI package named `cosyvoice`. It follows cosyvoice/cli/cosyvoice.py (plus frontend.py/model.py)
at commit ace7c47f41bbd303aa6bf1ea80e6f9fbd595cd40 (2026-03-16), using the same class names, constructor and method
signatures, the `sample_rate` attribute, and the same yield format: {'tts_speech': float32 tensor (1, T)}.
There are no weights: each text segment becomes a 220 Hz tone lasting SEC_PER_CHAR seconds per character.

Behaviour copied from the real code:
  * The model dir must contain cosyvoice.yaml / cosyvoice2.yaml / cosyvoice3.yaml, or ValueError('<dir>/<yaml> not found!').
    If the yaml names another family's LLM class, AssertionError('do not use <dir> for CosyVoice2 initialization!').
    AutoModel(**kwargs) checks the three yamls in that order, or raises TypeError('No valid model type found!').
  * sample_rate comes from the yaml's `sample_rate:` when that is present; otherwise 22050 for v1 and 24000 for v2/v3.
  * prompt_wav is a wav PATH (or file object) read with soundfile; it must be >= 16 kHz and <= 30 s. Each text segment
    loads it 3 times, like the real frontend, so a file object breaks on its second read (the real code fails the same way).
  * tts_text may be a *generator* of str (bistream) only on CosyVoice2/3 (typing.Generator check; a list or other
    iterator is not accepted). Bistream skips text normalization and sentence splitting. A str is split into sentences.
  * CosyVoice3 requires '<|endofprompt|>' in prompt_text + tts_text (in prompt_text alone when bistream).
  * stream=True chunking follows model.py. v1: 100-token hops at 50 tok/s (2 s each). v2/v3: 25 tok/s; the first hop is
    25 tokens plus padding that rounds the prompt's token count up to a multiple of 25. Each hop needs 3 lookahead tokens.
    Hops then double up to 100 tokens (4 s). The hop length is stored on the model object, `.model.token_hop_len`
    (model.py's CosyVoice2Model), and never reset, as in the real code, so later calls start with larger hops unless
    the caller resets it. speed is applied only when stream=False.
Differences: the real code runs the LLM (which pulls from the text generator) in a background thread. The
'<|endofprompt|>' assert and the v1-generator assert fail inside that thread and never reach the caller (with stream=True
the caller then hangs). Here they raise AssertionError at the first next(). The wav asserts and KeyError for an unknown
spk id happen in the caller in both. Here the generator is pulled lazily in the caller's thread. Every call is in CALLS.
"""
import math
import os
import re
from types import SimpleNamespace
from typing import Generator

import numpy as np
import torch

SEC_PER_CHAR = 0.06
CALLS = []  # list of (event, dict): '__init__', 'load_prompt_wav', 'add_zero_shot_spk', 'inference_*', 'segment', 'text_piece', 'chunk'
_FAMILY = {'CosyVoice': ('cosyvoice.yaml', 22050, 50, 'TransformerLM'),
           'CosyVoice2': ('cosyvoice2.yaml', 24000, 25, 'Qwen2LM'),
           'CosyVoice3': ('cosyvoice3.yaml', 24000, 25, 'CosyVoice3LM')}


def reset_calls():
    CALLS.clear()


def calls(event=None):
    return [kw for ev, kw in CALLS if event is None or ev == event]


def _describe(x):
    return '<generator>' if isinstance(x, Generator) else x if isinstance(x, (str, type(None))) else '<%s>' % type(x).__name__


def _load_wav(wav):
    import soundfile
    data, sr = soundfile.read(wav, dtype='float32', always_2d=True)
    assert sr >= 16000, 'wav sample rate {} must be greater than {}'.format(sr, 16000)
    return data.mean(axis=1), sr


def _text_normalize(text, split=True, text_frontend=True):
    """Simplified frontend.text_normalize: sentence split, merge to roughly 60-80 tokens, drop punctuation-only parts."""
    if isinstance(text, Generator):
        return [text]
    if '<|' in text and '|>' in text:
        text_frontend = False
    if text_frontend is False or text == '':
        return [text] if split else text
    text = text.strip()
    if not split:
        return text
    zh = re.search('[\u4e00-\u9fff]', text) is not None
    punc = '。？！；：、.?!;' if zh else '.?!;:'
    text = text if text[-1] in punc else text + ('。' if zh else '.')
    size = len if zh else (lambda s: int(len(s.split()) * 1.3))  # rough BPE token count
    out, cur = [], ''
    for utt in re.findall('[^%s]+[%s]' % (re.escape(punc), re.escape(punc)), text):
        if size(cur + utt) > 80 and size(cur) > 60:
            out, cur = out + [cur], ''
        cur += utt
    if cur:
        out = out[:-1] + [out[-1] + cur] if out and size(cur) < 20 else out + [cur]
    return [t for t in out if re.search(r'\w', t)]


class _FrontEnd:
    def __init__(self):
        self.spk2info = {}


class CosyVoice:
    def __init__(self, model_dir, load_jit=False, load_trt=False, fp16=False, trt_concurrent=1):
        self._setup(model_dir, load_jit=load_jit, load_trt=load_trt, fp16=fp16, trt_concurrent=trt_concurrent)

    def _setup(self, model_dir, **flags):
        name = type(self).__name__
        yaml_name, default_sr, self._token_rate, llm_cls = _FAMILY[name]
        self.model_dir, self.fp16 = model_dir, flags['fp16']
        if not os.path.exists(model_dir):
            raise FileNotFoundError('stand-in: real code would call modelscope snapshot_download({!r}) here'.format(model_dir))
        hyper_yaml_path = '{}/{}'.format(model_dir, yaml_name)
        if not os.path.exists(hyper_yaml_path):
            raise ValueError('{} not found!'.format(hyper_yaml_path))
        with open(hyper_yaml_path, 'r') as f:
            yaml_text = f.read()
        found = re.search(r'!new:cosyvoice\.llm\.llm\.(\w+)', yaml_text)
        assert found is None or found.group(1) == llm_cls, 'do not use {} for {} initialization!'.format(model_dir, name)
        sr = re.search(r'^sample_rate:\s*(\d+)', yaml_text, re.M)
        self.sample_rate = int(sr.group(1)) if sr else default_sr
        if not torch.cuda.is_available():  # real code silently switches the acceleration flags off without CUDA
            flags.update({k: False for k in ('load_jit', 'load_trt', 'load_vllm', 'fp16') if k in flags})
        self._vllm = flags.get('load_vllm', False)
        self.frontend = _FrontEnd()
        # v2/v3 model state (model.py's CosyVoice2Model.token_hop_len): grows per chunk and is never reset
        self.model = SimpleNamespace(token_hop_len=25) if name != 'CosyVoice' else SimpleNamespace()
        self._phase = 0
        CALLS.append(('__init__', dict(cls=name, model_dir=model_dir, **flags)))

    def list_available_spks(self):
        return list(self.frontend.spk2info.keys())

    def add_zero_shot_spk(self, prompt_text, prompt_wav, zero_shot_spk_id):
        assert zero_shot_spk_id != '', 'do not use empty zero_shot_spk_id'
        CALLS.append(('add_zero_shot_spk', dict(prompt_text=prompt_text, prompt_wav=_describe(prompt_wav), zero_shot_spk_id=zero_shot_spk_id)))
        self.frontend.spk2info[zero_shot_spk_id] = self._prompt(prompt_text, prompt_wav)  # real: no text_normalize here
        return True

    def save_spkinfo(self):
        CALLS.append(('save_spkinfo', dict(spks=self.list_available_spks())))

    def _prompt(self, prompt_text, prompt_wav):
        for _ in range(3):  # real frontend: speech feat @24k, speech tokens @16k, speaker embedding @16k
            speech, sr = _load_wav(prompt_wav)
        assert len(speech) / sr <= 30, 'do not support extract speech token for audio longer than 30s'
        CALLS.append(('load_prompt_wav', dict(prompt_wav=_describe(prompt_wav), sample_rate=sr, num_samples=len(speech), seconds=len(speech) / sr)))
        return {'prompt_text': prompt_text, 'prompt_tokens': int(len(speech) / sr * self._token_rate)}

    def inference_sft(self, tts_text, spk_id, stream=False, speed=1.0, text_frontend=True):
        raise NotImplementedError('stand-in implements zero_shot / cross_lingual / instruct2 only')

    def inference_zero_shot(self, tts_text, prompt_text, prompt_wav, zero_shot_spk_id='', stream=False, speed=1.0, text_frontend=True):
        CALLS.append(('inference_zero_shot', dict(tts_text=_describe(tts_text), prompt_text=prompt_text, prompt_wav=_describe(prompt_wav),
                                                  zero_shot_spk_id=zero_shot_spk_id, stream=stream, speed=speed, text_frontend=text_frontend)))
        return self._run(tts_text, _text_normalize(prompt_text, split=False, text_frontend=text_frontend), prompt_wav,
                         zero_shot_spk_id, stream, speed, text_frontend)

    def inference_cross_lingual(self, tts_text, prompt_wav, zero_shot_spk_id='', stream=False, speed=1.0, text_frontend=True):
        CALLS.append(('inference_cross_lingual', dict(tts_text=_describe(tts_text), prompt_wav=_describe(prompt_wav), zero_shot_spk_id=zero_shot_spk_id, stream=stream)))
        return self._run(tts_text, '', prompt_wav, zero_shot_spk_id, stream, speed, text_frontend)

    def inference_instruct(self, tts_text, spk_id, instruct_text, stream=False, speed=1.0, text_frontend=True):
        raise NotImplementedError('stand-in implements zero_shot / cross_lingual / instruct2 only')

    def inference_vc(self, source_wav, prompt_wav, stream=False, speed=1.0):
        raise NotImplementedError('stand-in implements zero_shot / cross_lingual / instruct2 only')

    def _run(self, tts_text, prompt_text, prompt_wav, zero_shot_spk_id, stream, speed, text_frontend):
        for seg in _text_normalize(tts_text, split=True, text_frontend=text_frontend):
            bistream = isinstance(seg, Generator)
            CALLS.append(('segment', dict(text='<generator>' if bistream else seg)))
            info = self._prompt(prompt_text, prompt_wav) if zero_shot_spk_id == '' else self.frontend.spk2info[zero_shot_spk_id]
            if bistream:
                assert type(self).__name__ != 'CosyVoice' and not self._vllm, \
                    'streaming input text is only implemented for CosyVoice2/3 and do not support vllm!'
            if type(self).__name__ == 'CosyVoice3':
                assert '<|endofprompt|>' in info['prompt_text'] + ('' if bistream else seg), \
                    '<|endofprompt|> not detected in CosyVoice3 text or prompt_text, check your input!'
            yield from self._tts(seg if bistream else [seg], bistream, info['prompt_tokens'], stream, speed)

    def _tts(self, pieces, bistream, prompt_tokens, stream, speed):
        v1 = self._token_rate == 50
        tokens, offset = 0.0, 0
        pad = 0 if v1 else int(math.ceil(prompt_tokens / 25) * 25 - prompt_tokens)
        for piece in pieces:
            if bistream:
                CALLS.append(('text_piece', dict(text=piece)))
            tokens += len(piece) * SEC_PER_CHAR * self._token_rate
            while stream:
                hop = 100 if v1 else self.model.token_hop_len + (pad if offset == 0 else 0)
                if tokens - offset < hop + (20 if v1 else 3):  # v1: token_overlap_len 20; v2/v3: pre_lookahead_len 3
                    break
                offset += hop
                if not v1:
                    self.model.token_hop_len = min(100, self.model.token_hop_len * 2)
                yield self._chunk(hop)
        rest = int(tokens) - offset
        if rest > 0:
            yield self._chunk(rest / (speed if not stream else 1.0))

    def _chunk(self, n_tokens):
        n = int(round(n_tokens * self.sample_rate / self._token_rate))
        t = (self._phase + np.arange(n)) / self.sample_rate
        self._phase += n
        CALLS.append(('chunk', dict(samples=n, seconds=n / self.sample_rate)))
        return {'tts_speech': torch.from_numpy((0.3 * np.sin(2 * np.pi * 220.0 * t)).astype(np.float32)).unsqueeze(0)}


class CosyVoice2(CosyVoice):
    def __init__(self, model_dir, load_jit=False, load_trt=False, load_vllm=False, fp16=False, trt_concurrent=1):
        self._setup(model_dir, load_jit=load_jit, load_trt=load_trt, load_vllm=load_vllm, fp16=fp16, trt_concurrent=trt_concurrent)

    def inference_instruct2(self, tts_text, instruct_text, prompt_wav, zero_shot_spk_id='', stream=False, speed=1.0, text_frontend=True):
        CALLS.append(('inference_instruct2', dict(tts_text=_describe(tts_text), instruct_text=instruct_text, prompt_wav=_describe(prompt_wav), stream=stream)))
        return self._run(tts_text, instruct_text, prompt_wav, zero_shot_spk_id, stream, speed, text_frontend)


class CosyVoice3(CosyVoice2):
    def __init__(self, model_dir, load_trt=False, load_vllm=False, fp16=False, trt_concurrent=1):
        self._setup(model_dir, load_trt=load_trt, load_vllm=load_vllm, fp16=fp16, trt_concurrent=trt_concurrent)


def AutoModel(**kwargs):
    if not os.path.exists(kwargs['model_dir']):
        raise FileNotFoundError('stand-in: real code would call modelscope snapshot_download({!r}) here'.format(kwargs['model_dir']))
    for yaml_name, cls in (('cosyvoice.yaml', CosyVoice), ('cosyvoice2.yaml', CosyVoice2), ('cosyvoice3.yaml', CosyVoice3)):
        if os.path.exists('{}/{}'.format(kwargs['model_dir'], yaml_name)):
            return cls(**kwargs)
    raise TypeError('No valid model type found!')
