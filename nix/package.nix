# The nixery binary, built from this repository.
#
#   pkgs.callPackage ./nix/package.nix { }
{
  lib,
  rustPlatform,
  makeWrapper,
  nix,
  git,
}:

rustPlatform.buildRustPackage {
  pname = "nixery";
  version = (lib.importTOML ../Cargo.toml).package.version;

  # Only what the build reads, so editing docs or tests does not rebuild.
  src = lib.fileset.toSource {
    root = ../.;
    fileset = lib.fileset.unions [
      ../Cargo.toml
      ../Cargo.lock
      ../src
      ../nix/prepare-image.nix
    ];
  };

  cargoLock.lockFile = ../Cargo.lock;

  nativeBuildInputs = [ makeWrapper ];

  # The tests start real Nix builds, docker and skopeo; they run in the
  # repository's CI (.ci/run), not in the build sandbox.
  doCheck = false;

  # prepare-image.nix is compiled into the binary (include_str!), which
  # writes it to STORAGE_PATH/nix at start: the binary always finds it.
  # The copy under share/ is for reading only.
  postInstall = ''
    install -Dm444 nix/prepare-image.nix $out/share/nixery/prepare-image.nix
    wrapProgram $out/bin/nixery --prefix PATH : ${
      lib.makeBinPath [
        nix
        git
      ]
    }
  '';

  meta = {
    description = "A container registry that builds images on demand with Nix";
    license = lib.licenses.asl20;
    mainProgram = "nixery";
    platforms = lib.platforms.linux;
  };
}
