# A package set about as costly to evaluate as nixpkgs, for scripts/bench
# (a benchmark input, not a fixture for correctness).
#
# Built the way nixpkgs is, from the real nixpkgs library (`./lib`, copied
# in by the bench from ../shared/vendor/nixpkgs-lib, MIT): a fixpoint over
# tens of thousands of attributes made of overlays (`composeManyExtensions`,
# `makeExtensible`), `callPackage` and `makeOverridable` for each package,
# and a bootstrap of several stages, each a whole package set whose
# `stdenv` the next stage builds on. Evaluating one package forces the
# spine (every attribute name) of every stage, as on nixpkgs.
#
# Packages are `pkg-<overlay>-<n>`; each build writes a few bytes and
# refers to a dependency or two in the overlays before it (at most three
# deep), so an image has a small closure.
# `scale` multiplies the attributes per overlay: at 8 (160,000 attributes
# per stage, 5 stages) evaluating one package takes about 1.1 s of CPU
# with Nix 2.8 (see the README's Performance section for the calibration).
{ system ? builtins.currentSystem, scale ? 8, lib ? import ./lib, ... }:

let
  overlays = 40;
  perOverlay = 500 * scale;
  stages = 5;

  # A package: a plain derivation with a little of what mkDerivation
  # computes (name, meta, passthru), referring to its dependencies.
  mkDerivation = stdenv: { pname, version, deps ? [ ] }:
    let
      drv = derivation {
        name = "${pname}-${version}";
        inherit system;
        builder = "/bin/sh";
        args = [ "-e" "-c" ''
          mkdir -p $out/share $out/bin
          echo ${pname} > $out/share/name
          ${lib.concatMapStrings (d: "echo ${d} >> $out/share/deps\n") deps}
          printf '#!/bin/sh\necho %s\n' ${pname} > $out/bin/${pname}
          chmod +x $out/bin/${pname}
        '' ];
        PATH = "/usr/bin:/bin";
        stdenv = stdenv.marker;
      };
    in
    drv // {
      inherit pname version;
      meta = {
        mainProgram = pname;
        license = lib.licenses.mit;
        platforms = lib.platforms.linux or [ system ];
      };
    };

  # Overlay i adds perOverlay packages, each depending on one or two of
  # the previous overlay's (looked up through `final`, as nixpkgs does).
  overlay = i: final: prev:
    lib.listToAttrs (lib.genList
      (n: lib.nameValuePair "pkg-${toString i}-${toString n}"
        (final.callPackage
          ({ stdenv, lib }: final.mkDerivation {
            pname = "pkg-${toString i}-${toString n}";
            version = "1.${toString n}";
            deps = lib.optionals (lib.mod i 4 != 0) ([
              final."pkg-${toString (i - 1)}-${toString n}"
            ] ++ lib.optional (lib.mod n 2 == 0)
              final."pkg-${toString (i - 1)}-${toString (lib.mod (n * 7 + 3) perOverlay)}");
          })
          { }))
      perOverlay);

  # One stage: the whole set, on the previous stage's stdenv.
  stage = previous: n:
    lib.makeExtensible (lib.extends
      (lib.composeManyExtensions (lib.genList overlay overlays))
      (final: {
        inherit lib;
        callPackage = lib.callPackageWith final;
        mkDerivation = mkDerivation final.stdenv;
        stdenv = {
          marker = "stage-${toString n}-${previous.stdenv.marker or "bootstrap"}";
        };
        # What nixery adds to every image.
        cacert = final.mkDerivation { pname = "nss-cacert"; version = "3"; };
        iana-etc = final.mkDerivation { pname = "iana-etc"; version = "1"; };
      }));

  final = lib.foldl' stage { } (lib.range 1 stages);
in
final
