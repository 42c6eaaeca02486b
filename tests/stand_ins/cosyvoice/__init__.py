# Test stand-in for the official CosyVoice package (github FunAudioLLM/CosyVoice).
# See cosyvoice/cli/cosyvoice.py for what it follows. (The real cosyvoice/__init__.py is empty.)
