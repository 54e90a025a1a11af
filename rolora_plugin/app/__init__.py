"""The application wing: the ``rolora`` command line, the demo, ``rolora train``, the real model/data assets,
evaluation and plots. It imports the library; the library never imports it."""
