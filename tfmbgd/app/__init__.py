"""The application: `train.py`'s flags (`cli`), the checks before TensorFlow starts and the
dispatch (`launch`), Ctrl-C and SIGTERM (`signals`), and the two modes beside a single
run: the batch-size study (`study`) and `--mode=compare` (`compare`)."""
