"""`python -m diffusers_dmdr.digits`: build (or reuse) the digits testbed; see `diffusers_dmdr.digits.build`."""

from .build import main


if __name__ == "__main__":
    main()
