//! The block family on real loop devices, each over a file the test made (and detaches, pass
//! or fail): blocks read and written through the user client's dma memory, the sharing rules,
//! read-only devices, ranges that don't fit, and discard's privilege.

use portcullis_client::{ClientError, Status, native::NativeSession};
use portcullis_proto::layout::AbiId;
use portcullis_tests::{Broker, BrokerSetup, LoopDevice};

const POLICY: &str = r#"
[[principal]]
name = "local"

[[principal]]
name = "root"
uid = [0]

[[rule]]
id = "block-use"
effect = "allow"
principals = ["local"]
service = { class = "BlockDevice" }
methods = ["*"]
memory = ["dma"]
open = "exclusive"

[[rule]]
id = "block-discard"
effect = "allow"
principals = ["root"]
service = { class = "BlockDevice" }
privileges = ["block.discard"]
"#;

const GET_GEOMETRY: u32 = 0;
const READ_BLOCKS: u32 = 1;
const WRITE_BLOCKS: u32 = 2;
const FLUSH: u32 = 3;
const DISCARD: u32 = 4;

/// 4 MiB where every byte says where it is.
fn disk() -> Vec<u8> {
    (0..4u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect()
}

fn broker_on(device: &LoopDevice, read_only: bool) -> Broker {
    let config = format!(
        "[[device]]\nname = \"disk0\"\ndriver = \"block\"\npath = \"{}\"\nread_only = {read_only}\n",
        device.path.display()
    );
    Broker::with(BrokerSetup {
        config: Some(&config),
        policy: Some(POLICY),
        ..BrokerSetup::default()
    })
}

async fn open(broker: &Broker, exclusive: bool) -> (NativeSession, u64) {
    let mut s = NativeSession::connect(broker.run_dir(), AbiId::native()).await.unwrap();
    let disk = s.find("disk0").await.unwrap().remove(0);
    let handle = s.open(disk.id, exclusive).await.unwrap();
    (s, handle)
}

fn status(e: &ClientError) -> Option<Status> {
    e.status()
}

#[tokio::test(flavor = "multi_thread")]
async fn block_reads_and_writes_real_blocks_through_dma() {
    let contents = disk();
    let device = LoopDevice::attach(&contents, false);
    let broker = broker_on(&device, false);
    let (mut s, h) = open(&broker, true).await;
    let geometry = s.call(h, GET_GEOMETRY, &[], &[], 64).await.unwrap().struct_out;
    assert_eq!(u64::from_ne_bytes(geometry[..8].try_into().unwrap()), 4 << 20);
    assert_eq!(u32::from_ne_bytes(geometry[8..12].try_into().unwrap()), 512);
    assert_eq!(geometry[16], 0, "writable");
    let dma = s.map_memory(h, 0).await.unwrap();
    // Blocks 8..24 land at dma offset 1024.
    let read = s.call(h, READ_BLOCKS, &[8, 16, 1024], &[], 0).await.unwrap();
    assert_eq!(read.scalars, vec![8192]);
    let mut got = vec![0u8; 8192];
    rustix::io::pread(&dma.fd, &mut got, 1024).unwrap();
    assert_eq!(got, contents[4096..4096 + 8192]);
    // Two blocks written from dma offset 0 reach the file.
    let payload: Vec<u8> = (0..1024u32).map(|i| (i % 251) as u8).collect();
    rustix::io::pwrite(&dma.fd, &payload, 0).unwrap();
    assert_eq!(
        s.call(h, WRITE_BLOCKS, &[100, 2, 0], &[], 0).await.unwrap().scalars,
        vec![1024]
    );
    s.call(h, FLUSH, &[], &[], 0).await.unwrap();
    let file = std::fs::read(&device.file).unwrap();
    assert_eq!(&file[51_200..52_224], &payload[..]);
    assert_eq!(&file[..51_200], &contents[..51_200], "nothing else changed");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_rust_client_reads_the_geometry_typed() {
    let device = LoopDevice::attach(&disk(), true);
    let broker = broker_on(&device, false);
    let (session, disk0) = broker.open("disk0", portcullis_client::OpenMode::Shared).await;
    let g = session.block_get_geometry(&disk0).await.unwrap();
    // What the kernel says of the device itself.
    let name = device.path.file_name().unwrap().to_str().unwrap();
    let rotational = std::fs::read_to_string(format!("/sys/block/{name}/queue/rotational")).unwrap();
    assert_eq!(
        g,
        portcullis_client::devices::BlockGeometry {
            size_bytes: 4 << 20,
            logical_block: 512,
            physical_block: g.physical_block,
            read_only: true,
            rotational: rotational.trim() == "1",
        }
    );
    assert!(g.physical_block >= 512);
}

#[tokio::test(flavor = "multi_thread")]
async fn block_shared_openers_read_and_only_an_exclusive_one_writes() {
    let device = LoopDevice::attach(&disk(), false);
    let broker = broker_on(&device, false);
    let (mut a, ha) = open(&broker, false).await;
    let (mut b, hb) = open(&broker, false).await;
    for (s, h) in [(&mut a, ha), (&mut b, hb)] {
        s.map_memory(h, 0).await.unwrap();
        assert_eq!(
            s.call(h, READ_BLOCKS, &[0, 1, 0], &[], 0).await.unwrap().scalars,
            vec![512]
        );
        let refused = s.call(h, WRITE_BLOCKS, &[0, 1, 0], &[], 0).await.unwrap_err();
        assert_eq!(status(&refused), Some(Status::NotWritable), "{refused}");
        assert!(refused.to_string().contains("open it exclusively"), "{refused}");
    }
    let mut c = NativeSession::connect(broker.run_dir(), AbiId::native()).await.unwrap();
    let disk0 = c.find("disk0").await.unwrap().remove(0);
    let busy = c.open(disk0.id, true).await.unwrap_err();
    assert_eq!(status(&busy), Some(Status::ExclusiveAccess));
    drop((a, b));
    // Once the readers are gone, an exclusive opener writes.
    let (mut w, hw) = loop {
        match c.open(disk0.id, true).await {
            Ok(h) => break (c, h),
            Err(e) => assert_eq!(status(&e), Some(Status::ExclusiveAccess), "{e}"),
        }
        tokio::task::yield_now().await;
    };
    w.map_memory(hw, 0).await.unwrap();
    w.call(hw, WRITE_BLOCKS, &[0, 1, 0], &[], 0).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn block_ranges_that_do_not_fit_are_refused_before_any_io() {
    let device = LoopDevice::attach(&disk(), false);
    let broker = broker_on(&device, false);
    let (mut s, h) = open(&broker, true).await;
    let unmapped = s.call(h, READ_BLOCKS, &[0, 1, 0], &[], 0).await.unwrap_err();
    assert_eq!(status(&unmapped), Some(Status::BadArgument), "{unmapped}");
    s.map_memory(h, 0).await.unwrap();
    let blocks = 8192u64; // 4 MiB of 512-byte blocks
    for (what, args) in [
        ("past the end", [blocks, 1, 0]),
        ("ending past the end", [blocks - 1, 2, 0]),
        ("zero blocks", [0, 0, 0]),
        ("more than dma holds", [0, 2049, 0]),
        ("a huge count", [0, u64::MAX, 0]),
        ("lba + count overflowing", [u64::MAX / 512, 4, 0]),
        ("a misaligned dma offset", [0, 1, 3]),
        ("a dma offset past its end", [0, 1, 1 << 20]),
    ] {
        for selector in [READ_BLOCKS, WRITE_BLOCKS] {
            let e = s.call(h, selector, &args, &[], 0).await.unwrap_err();
            assert_eq!(status(&e), Some(Status::BadArgument), "{what}: {e}");
        }
    }
    let e = s.call(h, DISCARD, &[blocks, 1], &[], 0).await.unwrap_err();
    assert_eq!(status(&e), Some(Status::BadArgument), "{e}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_read_only_device_reads_and_refuses_writes() {
    let contents = disk();
    let device = LoopDevice::attach(&contents, true);
    let broker = broker_on(&device, false);
    let (mut s, h) = open(&broker, true).await;
    let geometry = s.call(h, GET_GEOMETRY, &[], &[], 64).await.unwrap().struct_out;
    assert_eq!(geometry[16], 1, "read_only");
    let dma = s.map_memory(h, 0).await.unwrap();
    s.call(h, READ_BLOCKS, &[2, 1, 0], &[], 0).await.unwrap();
    let mut got = vec![0u8; 512];
    rustix::io::pread(&dma.fd, &mut got, 0).unwrap();
    assert_eq!(got, contents[1024..1536]);
    for (selector, args) in [
        (WRITE_BLOCKS, &[0u64, 1, 0][..]),
        (FLUSH, &[][..]),
        (DISCARD, &[0, 1][..]),
    ] {
        let e = s.call(h, selector, args, &[], 0).await.unwrap_err();
        assert_eq!(status(&e), Some(Status::NotWritable), "{e}");
        if selector != DISCARD {
            assert!(e.to_string().contains("read-only"), "{e}");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn discard_needs_its_privilege_and_empties_the_blocks() {
    let device = LoopDevice::attach(&disk(), false);
    let broker = broker_on(&device, false);
    let refused = broker.cli_as(
        portcullis_tests::NOBODY,
        &[
            "call",
            "disk0",
            "discard",
            "--scalar",
            "0",
            "--scalar",
            "8",
            "--exclusive",
        ],
    );
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("NOT_PRIVILEGED") && stderr.contains("block.discard"),
        "{stderr}"
    );
    let (mut s, h) = open(&broker, true).await;
    s.call(h, DISCARD, &[0, 8], &[], 0).await.unwrap();
    s.call(h, FLUSH, &[], &[], 0).await.unwrap();
    let dma = s.map_memory(h, 0).await.unwrap();
    s.call(h, READ_BLOCKS, &[0, 8, 0], &[], 0).await.unwrap();
    let mut got = vec![1u8; 4096];
    rustix::io::pread(&dma.fd, &mut got, 0).unwrap();
    assert!(
        got.iter().all(|b| *b == 0),
        "discarded blocks of a loop device read as zeros"
    );
}

#[test]
fn a_block_device_that_is_not_one_is_refused_at_start() {
    let dir = portcullis_tests::tempdir();
    let config = dir.path().join("c.toml");
    std::fs::write(
        &config,
        "[[device]]\nname = \"disk0\"\ndriver = \"block\"\npath = \"/dev/null\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(portcullis_tests::bin())
        .args(["broker", "--run-dir"])
        .arg(dir.path().join("run"))
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("/dev/null is character device 1:3, not a block device"),
        "{stderr}"
    );
}

/// The policy grants a family's methods, memory types and argument ranges one by one: here
/// geometry and small reads, but not the dma memory nor writes.
#[tokio::test(flavor = "multi_thread")]
async fn the_policy_grants_and_refuses_block_methods_memory_and_ranges() {
    const NARROW: &str = r#"
[[principal]]
name = "local"

[[rule]]
id = "block-look"
effect = "allow"
principals = ["local"]
service = { class = "BlockDevice" }
methods = ["get_geometry", "read_blocks"]
args.read_blocks.count = { max = 8 }
"#;
    let device = LoopDevice::attach(&disk(), false);
    let config = format!(
        "[[device]]\nname = \"disk0\"\ndriver = \"block\"\npath = \"{}\"\n",
        device.path.display()
    );
    let broker = Broker::with(BrokerSetup {
        config: Some(&config),
        policy: Some(NARROW),
        ..BrokerSetup::default()
    });
    let (mut s, h) = open(&broker, false).await;
    s.call(h, GET_GEOMETRY, &[], &[], 64).await.unwrap();
    let e = s.map_memory(h, 0).await.unwrap_err();
    assert_eq!(status(&e), Some(Status::NotPrivileged), "{e}");
    assert!(e.to_string().contains("dma"), "{e}");
    let e = s.call(h, WRITE_BLOCKS, &[0, 1, 0], &[], 0).await.unwrap_err();
    assert_eq!(status(&e), Some(Status::NotPrivileged), "{e}");
    let e = s.call(h, READ_BLOCKS, &[0, 16, 0], &[], 0).await.unwrap_err();
    assert_eq!(status(&e), Some(Status::NotPrivileged), "{e}");
    // Within the range the policy allows, the driver has its say: no dma memory mapped.
    let e = s.call(h, READ_BLOCKS, &[0, 8, 0], &[], 0).await.unwrap_err();
    assert_eq!(status(&e), Some(Status::BadArgument), "{e}");
}
