"""The RAG agent (s2s_server_pipeline_rag.py) with the fixed-latency test ASR and TTS of serve_test_models.py.

    python tests/serve_rag_test_models.py --asr fixed --tts fixed --llm openai --lm_model_url ... --kb_dir DOCS
"""
import serve_test_models  # the fixed ASR and TTS; puts the repository on the import path

import s2s_server_pipeline_rag as rag

if __name__ == "__main__":
    rag.main(parser=rag.add_arguments(serve_test_models.build_parser()))
