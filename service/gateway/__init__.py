"""The HTTP gateway: the API, the live session stream (SSE) and the web page."""
