"""Model service: FastAPI app (prediction, Grad-CAM, embeddings) run by gunicorn workers."""
