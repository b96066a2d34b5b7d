/* DP8390 / NE2000 constants (mirror of emulator/devices/dp8390.py). */
#ifndef PYVIRTIO_DP8390_H
#define PYVIRTIO_DP8390_H

#define NE_DATA_PORT 0x10
#define NE_RESET_PORT 0x1F

#define NE_PROM_SIZE 32
#define NE_PAGE_SIZE 256
#define NE_RAM_FIRST_PAGE 0x40
#define NE_RAM_END_PAGE 0x80

#define ETH_ALEN 6
#define ETH_HLEN 14
#define ETH_ZLEN 60
#define ETH_FRAME_LEN 1514
#define ETH_FCS_LEN 4
#define NE_RX_HEADER_LEN 4
#define NE_RX_ROOM_NEEDED (ETH_FRAME_LEN + NE_RX_HEADER_LEN)

/* registers (offsets from the I/O base; page = CR.PS) */
#define DP_CR 0x00
#define DP_PSTART 0x01
#define DP_PSTOP 0x02
#define DP_BNRY 0x03
#define DP_TPSR 0x04
#define DP_TBCR0 0x05
#define DP_TBCR1 0x06
#define DP_ISR 0x07
#define DP_RSAR0 0x08
#define DP_RSAR1 0x09
#define DP_RBCR0 0x0A
#define DP_RBCR1 0x0B
#define DP_RCR 0x0C
#define DP_TCR 0x0D
#define DP_DCR 0x0E
#define DP_IMR 0x0F
#define DP_TSR 0x04
#define DP_P1_PAR0 0x01
#define DP_P1_CURR 0x07
#define DP_P1_MAR0 0x08

#define CR_STP 0x01
#define CR_STA 0x02
#define CR_TXP 0x04
#define CR_RD_READ 0x08
#define CR_RD_WRITE 0x10
#define CR_RD_ABORT 0x20
#define CR_PAGE0 0x00
#define CR_PAGE1 0x40

#define ISR_PRX 0x01
#define ISR_PTX 0x02
#define ISR_RXE 0x04
#define ISR_TXE 0x08
#define ISR_OVW 0x10
#define ISR_CNT 0x20
#define ISR_RDC 0x40
#define ISR_RST 0x80

#define DCR_WTS 0x01
#define DCR_LS 0x08
#define DCR_FT1 0x40

#define TCR_LB_INTERNAL 0x02
#define RCR_AB 0x04
#define RCR_MON 0x20

#define RSR_PRX 0x01

#endif
