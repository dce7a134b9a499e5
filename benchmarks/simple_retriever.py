"""The baseline for the serving benchmark: a retriever of the simple design, written here on purpose.

One request = one encode (fp32, the model as loaded) + one Chroma HNSW query, in a synchronous
FastAPI endpoint (FastAPI runs it in its thread pool), JSON through FastAPI's default encoder.
Same store, same model, same wire format as `drzero serve-retriever`, so the two are compared on
design alone.

    python benchmarks/simple_retriever.py --db DIR --port 8001 [--device cuda]
"""

from __future__ import annotations

from pydantic import BaseModel

import _env

_env.setup(ANONYMIZED_TELEMETRY="False")


class Request(BaseModel):
    queries: list[str]
    topk: int = 3
    return_scores: bool = True


def create_app(db: str, device: str):
    from fastapi import FastAPI

    from drzero.corpus.embedder import load_sentence_transformer
    from drzero.corpus.store import CorpusStore

    store = CorpusStore.open_existing(db)
    spec = store.recorded_spec()
    model = load_sentence_transformer(spec.name, device=device)
    app = FastAPI()

    @app.post("/retrieve")
    def retrieve(request: Request):
        vectors = model.encode([spec.query_prefix + q for q in request.queries], normalize_embeddings=True,
                               convert_to_numpy=True, show_progress_bar=False)
        hits = store.query(vectors, request.topk)
        return {"result": [[hit.to_json(request.return_scores) for hit in per_query] for per_query in hits]}

    @app.get("/health")
    def health():
        return {"status": "ok"}

    return app


def main() -> None:
    parser = _env.parser(__doc__)
    parser.add_argument("--db", required=True)
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    import uvicorn

    uvicorn.run(create_app(args.db, args.device), host="127.0.0.1", port=args.port, log_level="warning",
                access_log=False)


if __name__ == "__main__":
    main()
