"""The four stages of the Kandinsky 2.2 graph, one module each.

Each module holds a plain torch class (the model math, testable without Ray)
and a thin Ray Serve deployment around it.
"""
