"""What a deployment bundle needs at run time: decode images, verify files, run the ONNX model, serve HTTP.

This package imports nothing from the rest of kiln (only the standard library, numpy, Pillow and onnxruntime;
the HTTP server adds FastAPI, uvicorn and python-multipart), and only relative imports inside it: the package
stage copies it verbatim into every bundle as `kiln_runtime/`, so a bundle runs without kiln, torch or Prefect.
The training side imports the same modules, so images are decoded the same way in training and in serving.
"""
