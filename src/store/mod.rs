//! Where content and records live: the blob store on disk (`fs`), the sled
//! database (`db`), the file system's free space (`disk`), when images were
//! last pulled (`pulls`), the garbage collector that uses them (`gc`) and
//! its background runs (`collector`), and the space set aside to start on a
//! full disk (`reserve`).

pub mod collector;
pub mod db;
pub mod disk;
pub mod fs;
pub mod gc;
pub mod pulls;
pub mod reserve;
